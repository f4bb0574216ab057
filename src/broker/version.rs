//! Which RabbitMQ the worker talks to (contract §1, §7). The brokers differ in
//! how they return, requeue and count deliveries, so an operator must be able to
//! see the version: it is logged at every connect, exposed as
//! `qty_worker_broker_info{product, version}`, and a version outside the tested
//! range (3.10 up to, not including, 5.0) is warned about once.
//!
//! AMQP tells the version only in `connection.start`'s server properties, which
//! lapin reads and drops. So after each connect the worker reads them on a short
//! connection of its own: the protocol header, `start`, then a complete and
//! polite handshake and `connection.close` (a socket simply dropped mid-handshake
//! makes the broker log a warning at every reconnect).

use crate::metrics::Metrics;
use futures::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use lapin::protocol::{AMQPClass, connection, parse_class};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use std::time::Duration;

/// The oldest tested release (Debian 12's 3.10) and the first untested major.
const TESTED_FROM: (u32, u32) = (3, 10);
const UNTESTED_FROM_MAJOR: u32 = 5;

/// How long the probe may take before it is given up (the version then stays
/// unshown until the next connect).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker's `product` and `version` server properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerVersion {
    pub product: String,
    pub version: String,
}

impl BrokerVersion {
    /// Whether this is a release the project tests on. A version that does not
    /// parse is untested.
    pub fn tested(&self) -> bool {
        match major_minor(&self.version) {
            Some((major, minor)) => (major, minor) >= TESTED_FROM && major < UNTESTED_FROM_MAJOR,
            None => false,
        }
    }

    fn from_properties(properties: &FieldTable) -> BrokerVersion {
        let text = |key: &str| match properties.inner().get(key) {
            Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into(),
            Some(AMQPValue::ShortString(text)) => text.to_string(),
            _ => "unknown".to_owned(),
        };
        BrokerVersion {
            product: text("product"),
            version: text("version"),
        }
    }
}

/// `4.3.6` → (4, 3); `3.10.8+1.gabc` → (3, 10).
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Why the version could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach the node: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker did not answer like AMQP 0-9-1: {0}")]
    Protocol(&'static str),
    #[error("no answer within {PROBE_TIMEOUT:?}")]
    Timeout,
}

/// Logs the version the worker is connected to, exposes it, and warns when it
/// is untested: once for each change of version, not at every reconnect.
pub fn announce(found: &BrokerVersion, node: &str, metrics: &Metrics) {
    let changed = metrics.set_broker_info(&found.product, &found.version);
    tracing::info!(
        product = %found.product,
        version = %found.version,
        node,
        "connected to the broker"
    );
    if changed && !found.tested() {
        tracing::warn!(
            product = %found.product,
            version = %found.version,
            "this RabbitMQ version is outside the tested range (3.10 to 4.x); the worker runs, but how it returns, requeues and counts deliveries is unverified"
        );
    }
}

/// Reads the server properties over `stream`, a fresh connection to the node
/// of `uri`, and closes it with AMQP's handshake.
pub async fn probe<S>(stream: S, uri: &AMQPUri) -> Result<BrokerVersion, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(PROBE_TIMEOUT, handshake(stream, uri))
        .await
        .map_err(|_| ProbeError::Timeout)?
}

async fn handshake<S>(mut stream: S, uri: &AMQPUri) -> Result<BrokerVersion, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) =
        read_method(&mut stream).await?
    else {
        return Err(ProbeError::Protocol(
            "the first method was not connection.start",
        ));
    };
    let found = BrokerVersion::from_properties(&start.server_properties);
    // The rest only closes the connection politely; what it says is not needed.
    if let Err(error) = close_politely(&mut stream, uri).await {
        tracing::debug!(%error, "the version probe's connection did not close cleanly");
    }
    Ok(found)
}

async fn close_politely<S>(stream: &mut S, uri: &AMQPUri) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let user = &uri.authority.userinfo;
    let mut properties = FieldTable::default();
    properties.insert(
        "connection_name".into(),
        AMQPValue::LongString("qty-worker version probe".into()),
    );
    let response = format!("\0{}\0{}", user.username, user.password);
    write_method(
        stream,
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: properties,
            mechanism: ShortString::from("PLAIN"),
            response: LongString::from(response.as_bytes().to_vec()),
            locale: ShortString::from("en_US"),
        }),
    )
    .await?;
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = read_method(stream).await?
    else {
        return Err(ProbeError::Protocol(
            "expected connection.tune (refused credentials?)",
        ));
    };
    write_method(
        stream,
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        }),
    )
    .await?;
    write_method(
        stream,
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: ShortString::from(uri.vhost.as_str()),
        }),
    )
    .await?;
    read_method(stream).await?;
    write_method(
        stream,
        connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: ShortString::from("version read"),
            class_id: 0,
            method_id: 0,
        }),
    )
    .await?;
    read_method(stream).await?;
    Ok(())
}

/// A frame's type for a method, and the octet that ends every frame.
const FRAME_METHOD: u8 = 1;
const FRAME_END: u8 = 0xCE;

async fn write_method<S>(stream: &mut S, method: connection::AMQPMethod) -> Result<(), ProbeError>
where
    S: AsyncWrite + Unpin,
{
    let class = AMQPClass::Connection(method);
    let payload = cookie_factory::gen_simple(lapin::protocol::gen_class(&class), Vec::new())
        .map_err(|_| ProbeError::Protocol("cannot encode a method"))?;
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.push(FRAME_METHOD);
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(FRAME_END);
    stream.write_all(&frame).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads frames until a method frame, and parses it (heartbeats are skipped).
async fn read_method<S>(stream: &mut S) -> Result<AMQPClass, ProbeError>
where
    S: AsyncRead + Unpin,
{
    loop {
        let mut header = [0u8; 7];
        stream.read_exact(&mut header).await?;
        if &header[..4] == b"AMQP" {
            return Err(ProbeError::Protocol(
                "the broker refused the protocol version",
            ));
        }
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if size > 1 << 20 {
            return Err(ProbeError::Protocol(
                "a frame larger than any handshake frame",
            ));
        }
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload).await?;
        if payload.pop() != Some(FRAME_END) {
            return Err(ProbeError::Protocol("a frame without its end octet"));
        }
        if header[0] != FRAME_METHOD {
            continue;
        }
        return parse_class(payload.as_slice())
            .map(|(_, class)| class)
            .map_err(|_| ProbeError::Protocol("a method that does not parse"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(version: &str) -> BrokerVersion {
        BrokerVersion {
            product: "RabbitMQ".into(),
            version: version.into(),
        }
    }

    #[test]
    fn the_tested_range_is_3_10_up_to_5_0() {
        for tested in [
            "3.10.8",
            "3.13.7",
            "4.0.5",
            "4.3.6",
            "4.99.0",
            "3.10.0+rc.1",
        ] {
            assert!(version(tested).tested(), "{tested}");
        }
        for untested in [
            "3.9.29", "3.8.0", "2.8.7", "5.0.0", "6.1", "unknown", "", "4",
        ] {
            assert!(!version(untested).tested(), "{untested}");
        }
    }

    #[test]
    fn product_and_version_come_from_the_server_properties() {
        let mut properties = FieldTable::default();
        properties.insert("product".into(), AMQPValue::LongString("RabbitMQ".into()));
        properties.insert("version".into(), AMQPValue::LongString("4.3.6".into()));
        assert_eq!(
            BrokerVersion::from_properties(&properties),
            version("4.3.6")
        );
        let empty = BrokerVersion::from_properties(&FieldTable::default());
        assert_eq!(
            (empty.product.as_str(), empty.version.as_str()),
            ("unknown", "unknown")
        );
    }
}
