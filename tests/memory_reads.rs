//! Reads from memory, on SQLite and PostgreSQL: Photos' cached reads touch
//! no database; a restarted Photos loads exactly what it persisted; a copy
//! is only ever seen at one revision; a photo's write is in the very next
//! read.

use std::{sync::Arc, time::Duration};

use lightbox_api::{
    photos::{
        Consistency, CreatePhotoRequest, DeletePhotoRequest, GetPhotoRequest, GetProfileRequest, ListPhotosRequest,
        Photo, photos_service_server::PhotosService as _,
    },
    users::{CreateUserRequest, User},
};
use lightbox_app::Target;
use lightbox_cache::{Cache, CacheOptions};
use lightbox_changefeed::{Backend, Db, Feed, FeedOptions, Retention};
use lightbox_photos::{PhotosOptions, PhotosService};
use lightbox_testkit::{Stack, TestDb, conformance, customer, eventually, upstream};
use tonic::Request;

conformance!(
    cached_reads_answer_with_the_database_gone,
    a_restart_with_the_upstreams_down_loads_exactly_what_was_persisted,
    a_copy_is_only_ever_seen_at_one_revision,
    a_photo_is_in_the_very_next_read_after_its_create_and_its_delete,
);

fn feed_options() -> FeedOptions {
    FeedOptions {
        progress_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

/// Another database of `like`'s backend.
async fn another(like: &TestDb) -> TestDb {
    match like.backend() {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => match TestDb::postgres().await {
            Some(db) => db,
            None => panic!("PostgreSQL went away"),
        },
    }
}

/// A Photos service of the test's own over `db`, following the stack's
/// Users and Contracts (its methods are called directly: no server).
async fn photos_over(stack: &Stack, db: Db) -> PhotosService {
    PhotosService::open(
        db,
        feed_options(),
        CacheOptions {
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..CacheOptions::default()
        },
        upstream(stack.addr(Target::Users)),
        upstream(stack.addr(Target::Contracts)),
        PhotosOptions::default(),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot open photos: {err}"))
}

fn new_photo(user: &User, title: &str) -> CreatePhotoRequest {
    CreatePhotoRequest {
        photo: Some(Photo {
            user_id: user.id.clone(),
            title: title.into(),
            content_type: "image/jpeg".into(),
            size_bytes: 1000,
            ..Photo::default()
        }),
    }
}

fn list(user: &User, consistency: Consistency) -> ListPhotosRequest {
    ListPhotosRequest {
        user_id: user.id.clone(),
        consistency: consistency as i32,
        page_size: 100,
        ..ListPhotosRequest::default()
    }
}

async fn titles(photos: &PhotosService, user: &User) -> Vec<String> {
    let answer = photos
        .list_photos(Request::new(list(user, Consistency::Cached)))
        .await
        .unwrap_or_else(|status| panic!("cached list: {status:?}"))
        .into_inner();
    answer.photos.into_iter().map(|p| p.title).collect()
}

/// Closing Photos' pool makes every query fail: what still answers reads
/// from memory only.
async fn cached_reads_answer_with_the_database_gone(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "memory@example.com", "50").await;
    let own = another(stack.db(Target::Contracts)).await;
    let pool = own.connect().await;
    let photos = photos_over(&stack, pool.clone()).await;
    let follower = tokio::spawn({
        let photos = photos.clone();
        async move { photos.follow().await }
    });
    assert!(
        photos
            .users_copy()
            .wait_for(user.revision, Duration::from_secs(10))
            .await
    );
    assert!(
        photos
            .contracts_copy()
            .wait_for(contract.revision, Duration::from_secs(10))
            .await
    );
    for n in 0..12 {
        photos
            .create_photo(Request::new(new_photo(&user, &format!("photo {n:02}"))))
            .await
            .unwrap_or_else(|status| panic!("create: {status:?}"));
    }
    let before = titles(&photos, &user).await;
    assert_eq!(before.len(), 12);

    pool.pool().close().await;
    // FRESH reads the database, which is gone: an outage (UNAVAILABLE,
    // saying so), not an internal error; a write likewise.
    let gone = |status: Option<tonic::Status>| {
        status.is_some_and(|s| s.code() == tonic::Code::Unavailable && s.message().contains("database is unreachable"))
    };
    let fresh = photos.list_photos(Request::new(list(&user, Consistency::Fresh))).await;
    assert!(gone(fresh.as_ref().err().cloned()), "{fresh:?}");
    let write = photos.create_photo(Request::new(new_photo(&user, "lost"))).await;
    assert!(gone(write.as_ref().err().cloned()), "{write:?}");

    // Every cached read still answers, with the same data.
    for _ in 0..20 {
        assert_eq!(titles(&photos, &user).await, before);
        let profile = photos
            .get_profile(Request::new(GetProfileRequest {
                user_id: user.id.clone(),
                ..GetProfileRequest::default()
            }))
            .await
            .unwrap_or_else(|status| panic!("cached profile with the database gone: {status:?}"))
            .into_inner();
        assert_eq!(profile.user.map(|u| u.id), Some(user.id.clone()));
        assert_eq!(profile.contract.map(|c| c.id), Some(contract.id.clone()));
    }
    let page = photos
        .list_photos(Request::new(ListPhotosRequest {
            page_size: 5,
            ..list(&user, Consistency::Cached)
        }))
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner();
    let next = photos
        .list_photos(Request::new(ListPhotosRequest {
            page_size: 5,
            page_token: page.next_page_token.clone(),
            ..list(&user, Consistency::Cached)
        }))
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner();
    let paged: Vec<String> = page.photos.into_iter().chain(next.photos).map(|p| p.title).collect();
    assert_eq!(paged, before[..10].to_vec(), "pages follow each other, newest first");
    let first = photos
        .get_photo(Request::new(GetPhotoRequest {
            id: before_id(&photos, &user).await,
            user_id: user.id.clone(),
        }))
        .await;
    assert!(first.is_ok(), "GetPhoto answers from memory: {first:?}");
    follower.abort();
    stack.stop().await;
}

async fn before_id(photos: &PhotosService, user: &User) -> String {
    photos
        .list_photos(Request::new(list(user, Consistency::Cached)))
        .await
        .ok()
        .and_then(|answer| answer.into_inner().photos.into_iter().next())
        .map(|photo| photo.id)
        .unwrap_or_default()
}

/// What the upstreams have now, by id: (revision, entity).
async fn upstream_users(stack: &Stack) -> std::collections::BTreeMap<String, (i64, User)> {
    let mut users = stack.users_client().await;
    let listed = users
        .list_users(lightbox_api::users::ListUsersRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner();
    listed
        .users
        .into_iter()
        .map(|u| (u.id.clone(), (u.revision, u)))
        .collect()
}

async fn a_restart_with_the_upstreams_down_loads_exactly_what_was_persisted(db: TestDb) {
    let mut stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "restart@example.com", "10").await;
    let mut users = stack.users_client().await;
    for n in 0..30 {
        users
            .create_user(CreateUserRequest {
                user: Some(User {
                    display_name: format!("Someone {n}"),
                    email: format!("someone{n}@example.com"),
                    ..User::default()
                }),
            })
            .await
            .unwrap_or_else(|status| panic!("{status:?}"));
    }
    let upstream = upstream_users(&stack).await;
    let head = upstream
        .values()
        .map(|(revision, _)| *revision)
        .max()
        .unwrap_or_default();

    let own = another(stack.db(Target::Contracts)).await;
    let photos = photos_over(&stack, own.connect().await).await;
    let follower = tokio::spawn({
        let photos = photos.clone();
        async move { photos.follow().await }
    });
    assert!(photos.users_copy().wait_for(head, Duration::from_secs(10)).await);
    assert!(
        photos
            .contracts_copy()
            .wait_for(contract.revision, Duration::from_secs(10))
            .await
    );
    follower.abort();
    drop(photos);

    stack.stop_component(Target::Users).await;
    stack.stop_component(Target::Contracts).await;
    let photos = photos_over(&stack, own.connect().await).await;
    for (copy_name, memory, persisted) in [
        ("users", entities(photos.users_copy().all()), {
            let (_, all) = photos.users_copy().persisted().await.unwrap_or_else(|e| panic!("{e}"));
            entities(all)
        }),
        ("contracts", entities(photos.contracts_copy().all()), {
            let (_, all) = photos
                .contracts_copy()
                .persisted()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            entities(all)
        }),
    ] {
        assert_eq!(
            memory, persisted,
            "the {copy_name} copy in memory is what was persisted"
        );
    }
    let in_memory: std::collections::BTreeMap<String, (i64, User)> = photos
        .users_copy()
        .all()
        .into_iter()
        .map(|(id, (u, revision))| (id, (revision, u)))
        .collect();
    assert_eq!(in_memory, upstream, "every user, at its revision");
    let (persisted_cursor, _) = photos.users_copy().persisted().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(photos.users_copy().state().applied_revision, persisted_cursor);
    assert!(persisted_cursor >= head);

    let profile = photos
        .get_profile(Request::new(GetProfileRequest {
            user_id: user.id.clone(),
            ..GetProfileRequest::default()
        }))
        .await
        .unwrap_or_else(|status| panic!("the restarted Photos answers from its copy: {status:?}"))
        .into_inner();
    assert_eq!(profile.contract.map(|c| c.id), Some(contract.id));
    stack.stop().await;
}

/// id -> (revision, encoded entity): comparable for any entity type.
fn entities<T: prost::Message>(
    all: std::collections::HashMap<String, (T, i64)>,
) -> std::collections::BTreeMap<String, (i64, Vec<u8>)> {
    all.into_iter()
        .map(|(id, (entity, revision))| (id, (revision, entity.encode_to_vec())))
        .collect()
}

/// Every write puts users `a` and then `b` at generation k (revisions
/// 2k-1 and 2k): the state at revision R is therefore known exactly, and a
/// reader must never see anything else at R — not `a` from a batch that is
/// still being applied, nor `b` from the one before.
async fn a_copy_is_only_ever_seen_at_one_revision(db: TestDb) {
    let upstream_db = another(&db).await;
    let pool = upstream_db.connect().await;
    pool.migrate(&[]).await.unwrap_or_else(|err| panic!("{err}"));
    let feed: Feed<User> = Feed::open(
        pool,
        "users",
        FeedOptions {
            retention: Retention {
                interval: None,
                ..Retention::default()
            },
            ..feed_options()
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}"));
    let copy_db = db.connect().await;
    copy_db
        .migrate(&[&lightbox_cache::MIGRATIONS])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let cache: Cache<User> = Cache::open(copy_db, "users", CacheOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let follower = tokio::spawn({
        let cache = cache.clone();
        let feed = feed.clone();
        async move { cache.follow(feed).await }
    });
    const WRITES: i64 = 300;
    let writer = tokio::spawn({
        let feed = feed.clone();
        async move {
            for k in 1..=WRITES {
                let mut tx = feed.begin().await.unwrap_or_else(|err| panic!("{err}"));
                for id in ["a", "b"] {
                    let user = User {
                        id: id.into(),
                        display_name: format!("gen {k}"),
                        ..User::default()
                    };
                    tx.put(id, &user).await.unwrap_or_else(|err| panic!("{err}"));
                }
                tx.commit().await.unwrap_or_else(|err| panic!("{err}"));
            }
        }
    });
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let cache = cache.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                loop {
                    let snapshot = cache.snapshot();
                    let at = snapshot.revision();
                    let name = |id: &str| snapshot.get(id).map(|(u, revision)| (u.display_name.clone(), revision));
                    let expect = |k: i64, revision: i64| (k > 0).then(|| (format!("gen {k}"), revision));
                    let (ka, kb) = ((at + 1) / 2, at / 2);
                    assert_eq!(
                        name("a"),
                        expect(ka, 2 * ka - 1),
                        "user a in the snapshot at revision {at}"
                    );
                    assert_eq!(name("b"), expect(kb, 2 * kb), "user b in the snapshot at revision {at}");
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if at >= 2 * WRITES {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    writer.await.unwrap_or_else(|err| panic!("the writer failed: {err}"));
    for reader in readers {
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap_or_else(|_| panic!("the copy never reached the last write"))
            .unwrap_or_else(|err| panic!("a reader saw a state that is not the state at one revision: {err}"));
    }
    assert!(seen.load(std::sync::atomic::Ordering::Relaxed) > 0);
    follower.abort();
}

async fn a_photo_is_in_the_very_next_read_after_its_create_and_its_delete(db: TestDb) {
    let stack = Stack::start(db, feed_options()).await;
    let (user, contract) = customer(&stack, "ryw@example.com", "1000").await;
    let mut client = stack.photos_client().await;
    eventually("Photos to have the customer's contract", || async {
        let request = ListPhotosRequest {
            min_contracts_revision: contract.revision,
            min_users_revision: user.revision,
            ..list(&user, Consistency::Cached)
        };
        client.clone().list_photos(request).await.ok()
    })
    .await;
    for n in 0..25 {
        let photo = client
            .create_photo(new_photo(&user, &format!("ryw {n}")))
            .await
            .unwrap_or_else(|status| panic!("{status:?}"))
            .into_inner()
            .photo
            .unwrap_or_default();
        let listed = client
            .list_photos(list(&user, Consistency::Cached))
            .await
            .unwrap_or_else(|status| panic!("{status:?}"))
            .into_inner();
        assert!(
            listed.photos.iter().any(|p| p.id == photo.id),
            "photo {n} is in the list right after its create"
        );
        let got = client
            .get_photo(GetPhotoRequest {
                id: photo.id.clone(),
                user_id: user.id.clone(),
            })
            .await;
        assert!(got.is_ok(), "photo {n} is found right after its create");
        client
            .delete_photo(DeletePhotoRequest {
                id: photo.id.clone(),
                user_id: user.id.clone(),
            })
            .await
            .unwrap_or_else(|status| panic!("{status:?}"));
        let listed = client
            .list_photos(list(&user, Consistency::Cached))
            .await
            .unwrap_or_else(|status| panic!("{status:?}"))
            .into_inner();
        assert!(
            !listed.photos.iter().any(|p| p.id == photo.id),
            "photo {n} is gone from the list right after its delete"
        );
    }
    stack.stop().await;
}
