//! `AMQP_URL`: one URL, or several comma-separated, one per node of a RabbitMQ
//! cluster. Every (re)connect tries them in turn, starting after the one that
//! failed last, so losing a node moves the worker to a live one.

use super::version::{BrokerVersion, ProbeError};
use crate::redact::redact;
use crate::settings::{BrokerArgs, SettingError};
use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use std::os::fd::AsFd as _;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Seconds between heartbeats unless a URL sets `?heartbeat=`.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// The broker's addresses, in order, and where the next connect starts.
#[derive(Debug)]
pub struct Addresses {
    nodes: Vec<Node>,
    /// PEM of extra CAs to trust for `amqps://`.
    ca: Option<String>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Node {
    uri: AMQPUri,
    /// The URL with its password hidden, for messages.
    shown: String,
}

/// No address accepted a connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach RabbitMQ: {0} (is it running? check AMQP_URL)")]
pub struct Unreachable(String);

impl Addresses {
    /// Parses `AMQP_URL` and reads `AMQP_CA_FILE`: what can never work is a
    /// [`SettingError`].
    pub fn parse(connections: &BrokerArgs) -> Result<Addresses, SettingError> {
        let mut nodes = Vec::new();
        for url in connections.amqp_url.split(',').map(str::trim) {
            let shown = redact(url);
            if url.is_empty() {
                return Err(SettingError::new(
                    "AMQP_URL",
                    "has an empty entry; separate complete URLs with commas",
                ));
            }
            let mut uri = AMQPUri::from_str(url).map_err(|why| {
                SettingError::new(
                    "AMQP_URL",
                    format!("{shown:?} is not a valid AMQP URL: {why}"),
                )
            })?;
            uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
            nodes.push(Node { uri, shown });
        }
        let ca = match &connections.amqp_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|why| {
                SettingError::new(
                    "AMQP_CA_FILE",
                    format!("{} cannot be read: {why}", path.display()),
                )
            })?),
            None => None,
        };
        Ok(Addresses {
            nodes,
            ca,
            next: AtomicUsize::new(0),
        })
    }

    /// How many addresses there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Connects to the first address that answers, trying each once, starting
    /// where the last connect left off. Returns the connection and its address's
    /// index, to pass to [`Addresses::lost`] when it fails.
    pub async fn connect(&self, name: &str) -> Result<(Connection, usize), Unreachable> {
        let first = self.next.load(Ordering::Relaxed);
        let mut refusals = Vec::new();
        for offset in 0..self.nodes.len() {
            let index = (first + offset) % self.nodes.len();
            let node = &self.nodes[index];
            match self.connect_to(node, name).await {
                Ok(connection) => {
                    self.next.store(index, Ordering::Relaxed);
                    return Ok((connection, index));
                }
                Err(error) => refusals.push(format!("{}: {error}", node.shown)),
            }
        }
        Err(Unreachable(refusals.join("; ")))
    }

    /// The connection to address `index` was lost: the next connect starts after it.
    pub fn lost(&self, index: usize) {
        self.next
            .store((index + 1) % self.nodes.len(), Ordering::Relaxed);
    }

    /// The user the connection to address `index` authenticates as.
    pub fn username(&self, index: usize) -> &str {
        &self.nodes[index].uri.authority.userinfo.username
    }

    /// The address `index`, password hidden.
    pub fn shown(&self, index: usize) -> &str {
        &self.nodes[index].shown
    }

    async fn connect_to(&self, node: &Node, name: &str) -> lapin::Result<Connection> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.as_bytes().to_vec()));
        let mut builder = DefaultConnectionBuilder::new()?
            .with_uri(node.uri.clone())
            .with_properties(properties);
        if self.ca.is_some() {
            builder = builder.with_tls_config(self.tls());
        }
        builder.connect().await
    }

    /// The TLS settings for `amqps://`: the system's roots, plus `AMQP_CA_FILE`.
    fn tls(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca.clone(),
        }
    }

    /// Connects like [`Addresses::connect`], and also returns a [`Cut`] that can
    /// drop the connection's socket at once.
    pub async fn connect_with_cut(
        &self,
        name: &str,
    ) -> Result<(Connection, usize, Cut), Unreachable> {
        let first = self.next.load(Ordering::Relaxed);
        let mut refusals = Vec::new();
        for offset in 0..self.nodes.len() {
            let index = (first + offset) % self.nodes.len();
            let node = &self.nodes[index];
            match self.connect_cuttable(node, name).await {
                Ok((connection, cut)) => {
                    self.next.store(index, Ordering::Relaxed);
                    return Ok((connection, index, cut));
                }
                Err(error) => refusals.push(format!("{}: {error}", node.shown)),
            }
        }
        Err(Unreachable(refusals.join("; ")))
    }

    /// lapin's own connect, with a copy of the socket kept aside for [`Cut`].
    async fn connect_cuttable(&self, node: &Node, name: &str) -> lapin::Result<(Connection, Cut)> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.as_bytes().to_vec()));
        let tls = self.tls();
        let cut = Cut::default();
        let socket = cut.clone();
        let connect = async move |uri: AMQPUri, runtime: async_rs::TokioRuntime| {
            open_stream(&uri, &runtime, &tls, Some(&socket)).await
        };
        let runtime = lapin::runtime::default_runtime()?;
        let connection =
            Connection::connector(node.uri.clone(), runtime, connect, properties).await?;
        Ok((connection, cut))
    }

    /// The product and version of the broker at address `index`, read on a
    /// short connection of its own (see `version`).
    pub async fn version(&self, index: usize) -> Result<BrokerVersion, ProbeError> {
        let uri = &self.nodes[index].uri;
        let runtime = lapin::runtime::default_runtime().map_err(std::io::Error::other)?;
        let stream = open_stream(uri, &runtime, &self.tls(), None)
            .await
            .map_err(std::io::Error::other)?;
        super::version::probe(stream, uri).await
    }
}

/// A TCP (or, for `amqps://`, TLS) stream to the node of `uri`; with `cut`, a
/// copy of its socket is kept there.
async fn open_stream(
    uri: &AMQPUri,
    runtime: &async_rs::TokioRuntime,
    tls: &OwnedTLSConfig,
    cut: Option<&Cut>,
) -> lapin::Result<AsyncTcpStream<<async_rs::TokioRuntime as async_rs::traits::Reactor>::TcpStream>>
{
    let address = runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
    let stream = AsyncTcpStream::connect(runtime, address)
        .await
        .map_err(lapin::Error::from)?;
    if let (Some(cut), AsyncTcpStream::Plain(plain)) = (cut, &stream) {
        let copy = plain
            .get_ref()
            .as_fd()
            .try_clone_to_owned()
            .map_err(lapin::Error::from)?;
        cut.keep(std::net::TcpStream::from(copy));
    }
    match uri.scheme {
        AMQPScheme::AMQP => Ok(stream),
        AMQPScheme::AMQPS => stream
            .into_tls(&uri.authority.host, tls.as_ref())
            .await
            .map_err(lapin::Error::from),
    }
}

/// Drops a connection's socket at once, without AMQP's closing handshake: the
/// broker sees the client vanish, as when its process is killed. RabbitMQ then
/// puts the connection's unacked deliveries back in their place *before* it
/// activates another single-active consumer, which a graceful close or a cancel
/// does not (the handover needs that order; see `partitions`).
#[derive(Debug, Clone, Default)]
pub struct Cut(Arc<Mutex<Option<std::net::TcpStream>>>);

impl Cut {
    fn keep(&self, socket: std::net::TcpStream) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
    }

    /// Shuts the socket down both ways; the connection fails at once.
    pub fn now(&self) {
        if let Some(socket) = &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            socket.shutdown(std::net::Shutdown::Both).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections(amqp_url: &str) -> BrokerArgs {
        BrokerArgs {
            amqp_url: amqp_url.into(),
            amqp_ca_file: None,
        }
    }

    #[test]
    fn a_list_of_urls_is_one_address_each_with_a_heartbeat() {
        let addresses = Addresses::parse(&connections(
            "amqp://u:a@n1:5672/%2f, amqp://u:b@n2:5673/%2f,amqp://u:c@n3/%2f?heartbeat=3",
        ))
        .expect("parses");
        assert_eq!(addresses.len(), 3);
        assert_eq!(addresses.nodes[1].uri.authority.port, 5673);
        assert_eq!(addresses.nodes[0].uri.query.heartbeat, Some(10));
        assert_eq!(addresses.nodes[2].uri.query.heartbeat, Some(3));
        assert_eq!(addresses.shown(1), "amqp://u:***@n2:5673/%2f");
    }

    #[test]
    fn a_lost_address_sends_the_next_connect_to_the_one_after_it() {
        let addresses = Addresses::parse(&connections("amqp://n1/%2f,amqp://n2/%2f,amqp://n3/%2f"))
            .expect("parses");
        addresses.lost(2);
        assert_eq!(addresses.next.load(Ordering::Relaxed), 0);
        addresses.lost(0);
        assert_eq!(addresses.next.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn what_can_never_work_names_the_setting_without_the_password() {
        for bad in [
            "amqp://h1,h2/",
            "amqp://u:secret@h1:notaport/%2f",
            "http://h/",
            "",
        ] {
            let error = Addresses::parse(&connections(bad)).expect_err("refused");
            assert_eq!(error.setting, "AMQP_URL", "{bad}");
            assert!(!error.message.contains("secret"), "{error}");
        }
    }
}
