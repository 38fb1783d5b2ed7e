//! Lightbox's side of the watch fan-out: `lightbox dev --target contracts`
//! (SQLite in a temporary directory) as a child process, so its memory and
//! CPU time are its own; one contract updated by the writer,
//! `WatchContracts` streams from now.

use std::time::Instant;

use lightbox_api::contracts::{
    Contract, ContractOption, CreateContractRequest, Plan, UpdateContractRequest, WatchContractsRequest,
    contracts_service_client::ContractsServiceClient, watch_contracts_response::Event,
};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{
    fanout::{PER_CONNECTION, Received, WatchSystem},
    harness::{Res, Server, connect},
};

/// The option of the contract that carries the write's number.
const SEQ: &str = "bench_seq";

/// A contracts server and the contract the writer updates.
pub struct Contracts {
    server: Server,
    writer: ContractsServiceClient<Channel>,
    contract: Contract,
}

impl Contracts {
    /// Starts the server (on core 0 when pinning) and creates the contract.
    pub async fn start(pinned: bool) -> Res<Contracts> {
        let server = Server::dev(
            pinned,
            &["contracts", "admin"],
            &[
                "--target",
                "contracts",
                "--no-demo",
                // Idle streams stay idle while they are weighed.
                "--progress-interval",
                "1h",
            ],
        )
        .await?;
        let mut writer = ContractsServiceClient::new(connect(&server.url("contracts")).await?);
        let contract = writer
            .create_contract(CreateContractRequest {
                contract: Some(Contract {
                    holder_user_id: "0190a3c2-7b1e-7000-8000-000000000001".into(),
                    plan: Plan::Standard as i32,
                    ..Contract::default()
                }),
            })
            .await?
            .into_inner()
            .contract
            .ok_or("CreateContract answered no contract")?;
        Ok(Contracts {
            server,
            writer,
            contract,
        })
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// The write number a contract carries.
fn seq_of(contract: &Contract) -> Option<u64> {
    contract
        .options
        .iter()
        .find(|option| option.code == SEQ)
        .and_then(|option| option.value.parse().ok())
}

impl WatchSystem for Contracts {
    fn name(&self) -> &'static str {
        "Lightbox"
    }

    fn server_pid(&self) -> u32 {
        self.server.pid
    }

    async fn open_watchers(&self, watchers: usize, writes: u64) -> Res<Vec<JoinHandle<Res<Received>>>> {
        let url = self.server.url("contracts");
        let mut tasks = Vec::with_capacity(watchers);
        let mut channel = None;
        for i in 0..watchers {
            if i % PER_CONNECTION == 0 {
                channel = Some(connect(&url).await?);
            }
            let mut client = ContractsServiceClient::new(channel.clone().ok_or("no channel")?);
            // From now: the first frame is progress at the head, and then
            // every write reaches the stream.
            let mut stream = client
                .watch_contracts(WatchContractsRequest {
                    since_revision: -1,
                    ..WatchContractsRequest::default()
                })
                .await?
                .into_inner();
            match stream.next().await {
                Some(Ok(frame)) if matches!(frame.event, Some(Event::Progress(_))) => {}
                other => return Err(format!("a watch from now began with {other:?}").into()),
            }
            tasks.push(tokio::spawn(async move {
                let mut received = Vec::with_capacity(writes as usize);
                while (received.len() as u64) < writes {
                    let frame = stream.next().await.ok_or("the watch ended")??;
                    if let Some(Event::Change(change)) = frame.event {
                        let seq = change
                            .contract
                            .as_ref()
                            .and_then(seq_of)
                            .ok_or("a change without its number")?;
                        received.push((seq, Instant::now()));
                    }
                }
                Ok(Received {
                    arrivals: received,
                    open: Box::new(stream),
                })
            }));
        }
        Ok(tasks)
    }

    async fn write(&self, seq: u64) -> Res<()> {
        let contract = Contract {
            options: vec![ContractOption {
                code: SEQ.into(),
                value: seq.to_string(),
                enabled: true,
            }],
            ..self.contract.clone()
        };
        self.writer
            .clone()
            .update_contract(UpdateContractRequest {
                contract: Some(contract),
                update_mask: None,
                expected_revision: 0,
            })
            .await?;
        Ok(())
    }
}
