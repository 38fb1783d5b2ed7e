//! Pull vs push over gRPC, on SQLite and PostgreSQL: the services' change
//! listings (`ListUserChanges`, `ListContractChanges`) feed copies that
//! reach exactly what copies fed by their watches reach, the mode chosen by
//! configuration ([`CacheOptions::follow`]).

use std::time::Duration;

use lightbox_api::{
    contracts::Contract,
    users::{DeleteUserRequest, User},
};
use lightbox_app::Target;
use lightbox_cache::{Cache, CacheOptions, FollowMode, PollOptions, sources};
use lightbox_changefeed::{Backend, Db, FeedOptions, feed::Entity};
use lightbox_testkit::{Stack, TestDb, conformance, customer, eventually, upstream};

conformance!(the_services_change_listings_feed_copies_over_grpc);

fn cache_options() -> CacheOptions {
    CacheOptions {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(2),
        ..CacheOptions::default()
    }
}

/// Every ~20 ms, pages of 4.
fn poll_options() -> PollOptions {
    PollOptions {
        interval: Duration::from_millis(20),
        page_size: 4,
        timeout: Duration::from_secs(5),
    }
}

/// A database of `like`'s backend, migrated for copies.
async fn local_db(like: &TestDb) -> (TestDb, Db) {
    let db = match like.backend() {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => match TestDb::postgres().await {
            Some(db) => db,
            None => panic!("PostgreSQL went away"),
        },
    };
    let pool = db.connect().await;
    pool.migrate(&[&lightbox_cache::MIGRATIONS])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    (db, pool)
}

async fn open<T: Entity>(db: &Db, name: &'static str, options: CacheOptions) -> Cache<T> {
    Cache::open(db.clone(), name, options)
        .await
        .unwrap_or_else(|err| panic!("{err}"))
}

async fn the_services_change_listings_feed_copies_over_grpc(db: TestDb) {
    let (_local, local) = local_db(&db).await;
    let feed = FeedOptions {
        progress_interval: Duration::from_millis(100),
        ..FeedOptions::default()
    };
    let stack = Stack::start(db, feed).await;
    let users = upstream(stack.addr(Target::Users));
    let contracts = upstream(stack.addr(Target::Contracts));
    let polling = CacheOptions {
        follow: FollowMode::Poll(poll_options()),
        ..cache_options()
    };
    // The same sources follow either way, by configuration.
    let users_pulled: Cache<User> = open(&local, "users_pull", polling.clone()).await;
    let users_pushed: Cache<User> = open(&local, "users_push", cache_options()).await;
    let contracts_pulled: Cache<Contract> = open(&local, "contracts_pull", polling).await;
    let contracts_pushed: Cache<Contract> = open(&local, "contracts_push", cache_options()).await;
    let follow_users = |cache: &Cache<User>| {
        let (cache, source) = (cache.clone(), sources::UsersSource::new(users.clone()));
        tokio::spawn(async move { cache.follow_upstream(source).await })
    };
    let follow_contracts = |cache: &Cache<Contract>| {
        let (cache, source) = (cache.clone(), sources::ContractsSource::new(contracts.clone()));
        tokio::spawn(async move { cache.follow_upstream(source).await })
    };
    let tasks = [
        follow_users(&users_pulled),
        follow_users(&users_pushed),
        follow_contracts(&contracts_pulled),
        follow_contracts(&contracts_pushed),
    ];
    let mut created = Vec::new();
    for i in 0..6 {
        created.push(customer(&stack, &format!("c{i}@example.com"), "100").await);
    }
    let mut client = stack.users_client().await;
    let deleted = client
        .delete_user(DeleteUserRequest {
            id: created[0].0.id.clone(),
            ..DeleteUserRequest::default()
        })
        .await
        .map(|r| r.into_inner().revision)
        .unwrap_or_else(|status| panic!("delete user: {status:?}"));
    let contracts_head = created.iter().map(|(_, c)| c.revision).max().unwrap_or_default();
    eventually("every copy past the last change", || async {
        (users_pulled.state().applied_revision >= deleted
            && users_pushed.state().applied_revision >= deleted
            && contracts_pulled.state().applied_revision >= contracts_head
            && contracts_pushed.state().applied_revision >= contracts_head)
            .then_some(())
    })
    .await;
    assert_eq!(users_pulled.all(), users_pushed.all());
    assert_eq!(users_pulled.all().len(), 5);
    assert_eq!(contracts_pulled.all(), contracts_pushed.all());
    assert_eq!(contracts_pulled.all().len(), 6);
    assert!(users_pulled.state().polls > 0 && contracts_pulled.state().polls > 0);
    assert_eq!(users_pushed.state().polls, 0);
    assert_eq!(users_pulled.state().reconnects, 0, "no poll failed");
    assert_eq!(contracts_pulled.state().reconnects, 0, "no poll failed");
    for task in tasks {
        task.abort();
    }
    stack.stop().await;
}
