//! `mailgrid serve`: a node with its client-facing listeners, until SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use storage::meta::MetaCommand;
use tokio_rustls::TlsAcceptor;

use crate::config::ServeConfig;
use imap::{Imap, ImapKind};
use pop3::{Pop3, Pop3Kind};
use service::metrics::MetricSource;
use service::node::Node;
use service::policy::throttle::AuthThrottle;
use service::server_tls;
use smtp::{ListenerKind, Smtp};

pub async fn run(dir: &Path, config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = ServeConfig::load(config_path)?;
    // Nothing is written into a directory that is not a node's.
    service::datadir::NodeFile::load(dir)?;
    let (cert, key) = match &config.tls {
        Some(pair) => pair.clone(),
        None => {
            server_tls::ensure_self_signed(dir, &config.hostname)?;
            server_tls::default_paths(dir)
        }
    };
    let acceptor = TlsAcceptor::from(server_tls::load(&cert, &key)?);
    let node: Arc<Node> = Node::start(dir, &config.node).await?;
    println!(
        "mailgrid node {} serving cluster on {}",
        node.file.node_id, node.file.cluster_addr
    );
    let failpoints = raft::failpoint::armed();
    if !failpoints.is_empty() {
        eprintln!(
            "warning: {} is set, this node will fail on purpose: {}",
            raft::failpoint::ENV,
            failpoints.join(", ")
        );
    }
    // A witness holds no mail: it serves no client protocol and sends no queued mail, only
    // its cluster port and the HTTP metrics.
    let witness = node.file.witness;
    if witness {
        println!("witness node: no mail listeners and no outbound queue (it holds no mail)");
    }
    let client = |addr: Option<std::net::SocketAddr>| addr.filter(|_| !witness);
    let throttle = Arc::new(AuthThrottle::new(config.auth.clone()));
    let smtp = Smtp::new(
        node.clone(),
        config.hostname.clone(),
        config.smtp.clone(),
        Some(acceptor.clone()),
        throttle.clone(),
    );
    let mut listeners = BTreeMap::new();
    let wanted = [
        (ListenerKind::Mx, client(config.listen.smtp)),
        (ListenerKind::Submission, client(config.listen.submission)),
        (ListenerKind::Submissions, client(config.listen.submissions)),
    ];
    for (kind, addr) in wanted {
        let Some(addr) = addr else { continue };
        let bound = smtp.listen(kind, addr).await?;
        println!("{} listening on {bound}", kind.name());
        listeners.insert(kind.name().to_string(), bound.to_string());
    }
    let pop3 = Pop3::new(
        node.clone(),
        config.pop3.clone(),
        Some(acceptor.clone()),
        throttle.clone(),
    );
    for (kind, addr) in [
        (Pop3Kind::Plain, client(config.listen.pop3)),
        (Pop3Kind::Tls, client(config.listen.pop3s)),
    ] {
        let Some(addr) = addr else { continue };
        let bound = pop3.listen(kind, addr).await?;
        println!("{} listening on {bound}", kind.name());
        listeners.insert(kind.name().to_string(), bound.to_string());
    }
    let imap = Imap::new(node.clone(), config.imap.clone(), Some(acceptor), throttle);
    for (kind, addr) in [
        (ImapKind::Plain, client(config.listen.imap)),
        (ImapKind::Tls, client(config.listen.imaps)),
    ] {
        let Some(addr) = addr else { continue };
        let bound = imap.listen(kind, addr).await?;
        println!("{} listening on {bound}", kind.name());
        listeners.insert(kind.name().to_string(), bound.to_string());
    }
    let outbound = outbound::Outbound::new(
        node.clone(),
        config.outbound.clone(),
        config.hostname.clone(),
    )?;
    if !witness {
        outbound.start();
    }
    if let Some(addr) = config.listen.http {
        let sources: Vec<Arc<dyn MetricSource>> =
            vec![outbound.clone(), node.clone(), imap.clone()];
        let bound = web::listen(sources, addr).await?;
        println!("http listening on {bound}");
        listeners.insert("http".to_string(), bound.to_string());
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    tokio::spawn(publish_listeners(node.clone(), listeners));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        why = unsupported_format(node.clone()) => Err(anyhow::anyhow!(why)),
    };
    node.host().shutdown().await;
    result
}

/// Returns (ending the process) once this node's copy of the meta state shows an active
/// cluster format this binary does not speak: it would meet messages and records it cannot
/// read. Checked at start and whenever the meta state may have moved on.
async fn unsupported_format(node: Arc<Node>) -> String {
    loop {
        let active = node.host().meta().read_meta(|m| m.cluster_format());
        if let Some(why) = active.ok().and_then(storage::version::unsupported) {
            tracing::error!("{why}");
            return why;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records the node's listeners in the meta state (so `status` shows where to connect),
/// retrying until the cluster takes it.
async fn publish_listeners(node: Arc<Node>, listeners: BTreeMap<String, String>) {
    let id = node.file.node_id;
    loop {
        let cmd = MetaCommand::SetListeners {
            id,
            listeners: listeners.clone(),
        };
        match node.router.meta_write(cmd).await {
            Ok(_) => return,
            Err(e) => tracing::debug!("recording listeners: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
