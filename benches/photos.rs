//! The seed's three problems in numbers, side by side in one run: `ListPhotos`
//! answered the event-driven way (`CACHED`, from Photos' local copies) and
//! the synchronous way (`FRESH`, Photos → Users → Contracts), with 0, 5, 20
//! and 100 ms of latency injected on each upstream; the calls each request makes
//! to the upstreams; the share answered with both upstreams down; and how
//! soon an upstream write can be read back from
//! Photos (write acknowledged → `ListPhotos` with `min_users_revision`
//! answers).
//!
//! `cargo bench --bench photos [-- --requests 300]`
//!
//! Everything runs in this process over loopback gRPC, on SQLite files:
//! the same components as `lightbox dev`, started by the test kit.

use std::time::{Duration, Instant};

use lightbox_api::{
    photos::{Consistency, ListPhotosRequest},
    users::{UpdateUserRequest, User},
};
use lightbox_app::Target;
use lightbox_changefeed::FeedOptions;
use lightbox_server::FaultSpec;
use lightbox_testkit::{Stack, TestDb, customer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let requests: usize = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(300);

    let stack = Stack::start(TestDb::sqlite(), FeedOptions::default()).await;
    let (user, contract) = customer(&stack, "customer@example.com", "1000").await;
    let (users_rev, contracts_rev) = (user.revision, contract.revision);
    let mut photos = stack.photos_client().await;
    // Photos' copies hold the customer before measuring.
    photos
        .list_photos(ListPhotosRequest {
            user_id: user.id.clone(),
            min_users_revision: users_rev,
            min_contracts_revision: contracts_rev,
            ..ListPhotosRequest::default()
        })
        .await?;

    println!("\nListPhotos, {requests} requests per row, one client, sequential");
    println!(
        "| latency injected per upstream | mode | p50 | p99 | upstream calls per request | FRESH p99 / CACHED p99 |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for latency_ms in [0u64, 5, 20, 100] {
        let latency = FaultSpec {
            latency: Duration::from_millis(latency_ms),
            ..FaultSpec::default()
        };
        for target in [Target::Users, Target::Contracts] {
            stack.faults(target).set(latency)?;
        }
        let mut rows = Vec::new();
        for consistency in [Consistency::Cached, Consistency::Fresh] {
            let calls_before = upstream_calls(&stack);
            let mut samples = Vec::with_capacity(requests);
            for _ in 0..requests {
                let started = Instant::now();
                photos
                    .list_photos(ListPhotosRequest {
                        user_id: user.id.clone(),
                        consistency: consistency as i32,
                        ..ListPhotosRequest::default()
                    })
                    .await?;
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            let calls = (upstream_calls(&stack) - calls_before) as f64 / requests as f64;
            rows.push((
                consistency,
                percentile(&mut samples, 0.5),
                percentile(&mut samples, 0.99),
                calls,
            ));
        }
        let ratio = rows[1].2 / rows[0].2;
        for (consistency, p50, p99, calls) in rows {
            let mode = if consistency == Consistency::Cached {
                "CACHED"
            } else {
                "FRESH"
            };
            let ratio = if consistency == Consistency::Fresh {
                format!("{ratio:.1}×")
            } else {
                String::new()
            };
            println!("| {latency_ms} ms | {mode} | {p50:.2} ms | {p99:.2} ms | {calls:.2} | {ratio} |");
        }
        for target in [Target::Users, Target::Contracts] {
            stack.faults(target).clear();
        }
    }

    // Success rate with the upstreams down.
    println!("\nListPhotos with Users and Contracts down (fault injection), {requests} requests per mode");
    println!("| mode | answered | failed fast (UNAVAILABLE) | p99 |");
    println!("|---|---:|---:|---:|");
    let down = FaultSpec {
        down: true,
        ..FaultSpec::default()
    };
    for target in [Target::Users, Target::Contracts] {
        stack.faults(target).set(down)?;
    }
    for consistency in [Consistency::Cached, Consistency::Fresh] {
        let (mut answered, mut unavailable, mut samples) = (0, 0, Vec::with_capacity(requests));
        for _ in 0..requests {
            let started = Instant::now();
            let result = photos
                .list_photos(ListPhotosRequest {
                    user_id: user.id.clone(),
                    consistency: consistency as i32,
                    ..ListPhotosRequest::default()
                })
                .await;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            match result {
                Ok(_) => answered += 1,
                Err(status) if status.code() == tonic::Code::Unavailable => unavailable += 1,
                Err(status) => return Err(format!("unexpected {status:?}").into()),
            }
        }
        let mode = if consistency == Consistency::Cached {
            "CACHED"
        } else {
            "FRESH"
        };
        let p99 = percentile(&mut samples, 0.99);
        println!("| {mode} | {answered} / {requests} | {unavailable} | {p99:.2} ms |");
    }
    for target in [Target::Users, Target::Contracts] {
        stack.faults(target).clear();
    }

    // Propagation: an upstream write, then a read that must reflect it.
    let mut users = stack.users_client().await;
    let mut samples = Vec::with_capacity(requests);
    for i in 0..requests {
        let written = users
            .update_user(UpdateUserRequest {
                user: Some(User {
                    display_name: format!("Customer {i}"),
                    ..user.clone()
                }),
                update_mask: None,
                expected_revision: 0,
            })
            .await?
            .into_inner()
            .user
            .ok_or("no user")?;
        let acknowledged = Instant::now();
        photos
            .list_photos(ListPhotosRequest {
                user_id: user.id.clone(),
                min_users_revision: written.revision,
                ..ListPhotosRequest::default()
            })
            .await?;
        samples.push(acknowledged.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "\nUpstream write → readable from Photos' copy ({requests} writes): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99)
    );
    stack.stop().await;
    Ok(())
}

/// Calls received by Users and Contracts so far (the copies' long-lived
/// watch streams count once, when opened).
fn upstream_calls(stack: &Stack) -> u64 {
    stack.faults(Target::Users).calls() + stack.faults(Target::Contracts).calls()
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]
}
