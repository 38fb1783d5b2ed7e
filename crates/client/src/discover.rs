//! [`Discovery`]: the background task of one channel. It turns the target
//! into endpoints (IP literals and `localhost` once, DNS names every
//! `dns_refresh`), starts a health [`Watcher`] per endpoint and aborts the
//! watchers of endpoints DNS no longer gives.
//!
//! Lifecycle: it owns the watchers (a `JoinSet`: dropping it aborts them
//! all) and runs until the stop sender, held by the channel's clones, is
//! dropped with the last clone.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use tokio::{
    sync::oneshot,
    task::{AbortHandle, JoinSet},
};

use crate::{
    ConnectOptions, Target,
    dial::Dialer,
    health::Watcher,
    registry::{Key, Registry},
    target::Address,
};

/// What the background task of one channel needs.
pub(crate) struct Discovery {
    pub(crate) target: Target,
    pub(crate) registry: Arc<Registry>,
    pub(crate) dialer: Arc<Dialer>,
    pub(crate) options: Arc<ConnectOptions>,
}

impl Discovery {
    /// Runs until `stop` closes (it is never sent: its sender drops with
    /// the last clone of the channel).
    pub(crate) async fn run(self, mut stop: oneshot::Receiver<()>) {
        let mut watchers = JoinSet::new();
        let mut running: HashMap<Key, AbortHandle> = HashMap::new();
        // The last good answer per address, kept when a lookup fails.
        let mut last: HashMap<usize, Vec<SocketAddr>> = HashMap::new();
        loop {
            let wanted = tokio::select! {
                wanted = self.endpoints(&mut last) => wanted,
                _ = &mut stop => return,
            };
            running.retain(|key, watcher| {
                let keep = wanted.contains(key);
                if !keep {
                    watcher.abort();
                    self.registry.remove(*key);
                }
                keep
            });
            for key in wanted {
                if running.contains_key(&key) {
                    continue;
                }
                let Some(address) = self.target.addresses().get(key.index) else {
                    continue;
                };
                let label: Arc<str> = match address.is_dns() {
                    true => format!("{} ({})", address.authority(), key.addr).into(),
                    false => key.addr.to_string().into(),
                };
                self.registry.insert(key, label.clone());
                let watcher = Watcher {
                    registry: self.registry.clone(),
                    key,
                    label,
                    address: address.clone(),
                    dialer: self.dialer.clone(),
                    options: self.options.clone(),
                };
                running.insert(key, watchers.spawn(watcher.run()));
            }
            self.registry.resolved();
            // Reap the aborted watchers' results.
            while watchers.try_join_next().is_some() {}
            if !self.target.needs_resolution() {
                // Nothing changes any more; wait for the end.
                let _ = (&mut stop).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(self.options.dns_refresh) => {}
                _ = &mut stop => return,
            }
        }
    }

    /// The endpoints the target has now.
    async fn endpoints(&self, last: &mut HashMap<usize, Vec<SocketAddr>>) -> BTreeSet<Key> {
        let mut wanted = BTreeSet::new();
        for (index, address) in self.target.addresses().iter().enumerate() {
            let addrs = match address.fixed_ip() {
                Some(ip) => vec![SocketAddr::new(ip, address.port())],
                None => self.lookup(index, address, last).await,
            };
            wanted.extend(addrs.into_iter().map(|addr| Key { index, addr }));
        }
        wanted
    }

    /// Resolves the name of `address`; on failure, the last good answer.
    async fn lookup(
        &self,
        index: usize,
        address: &Address,
        last: &mut HashMap<usize, Vec<SocketAddr>>,
    ) -> Vec<SocketAddr> {
        let host = address.host();
        let timeout = self.options.connect_timeout;
        let answer = tokio::time::timeout(timeout, self.options.resolver.resolve(&host, address.port())).await;
        let error = match answer {
            Ok(Ok(mut addrs)) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                if last.get(&index) != Some(&addrs) {
                    tracing::debug!(target = %self.registry.label(), %host, ?addrs, "DNS answer changed");
                }
                self.registry.dns_result(index, None);
                last.insert(index, addrs.clone());
                return addrs;
            }
            Ok(Ok(_)) => format!("DNS lookup of {host} found no address"),
            Ok(Err(err)) => format!("DNS lookup of {host} failed: {err}"),
            Err(_) => format!("DNS lookup of {host} gave no answer within {timeout:?}"),
        };
        let kept = last.get(&index).cloned().unwrap_or_default();
        tracing::warn!(target = %self.registry.label(), %error, kept = kept.len(), "DNS lookup failed; keeping the last answer");
        self.registry.dns_result(index, Some(error));
        kept
    }
}
