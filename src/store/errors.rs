//! The line between transient and permanent database errors, drawn by SQLSTATE.
//! Transient errors are retried in-process and never requeue a delivery; what
//! kind of transient error it is decides whether the connection is kept and
//! whether another host is looked for.

/// A database failure, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server cannot be reached, is going away or is out of resources:
    /// connection loss, SQLSTATE classes 08 and 53, shutdown (57P01–57P03),
    /// I/O, TLS and protocol failures, pool timeouts. Worth another host.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The server does not accept writes (25006): a standby, a primary being
    /// failed over, or a database set read-only. Worth a fresh connection, and
    /// another host.
    #[error("database refuses writes: {0}")]
    ReadOnly(#[source] sqlx::Error),
    /// The transaction lost a race worth retrying on the same connection:
    /// serialization failure (40001), deadlock (40P01), lock timeout (55P03),
    /// statement timeout or cancel (57014).
    #[error("database contention: {0}")]
    Contention(#[source] sqlx::Error),
    /// The role lacks a privilege (42501), e.g. EXECUTE on `qty_adjust` revoked:
    /// a configuration problem that a grant fixes, so retried like an outage
    /// rather than handing the delivery back towards its dead-letter limit.
    #[error("database permission denied: {0}")]
    PermissionDenied(#[source] sqlx::Error),
    /// Retrying will not help: a bug, a schema mismatch, a broken invariant.
    #[error("database error: {0}")]
    Permanent(#[source] sqlx::Error),
}

impl StoreError {
    /// Retried in-process until it passes.
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Permanent(_))
    }

    /// The connection it happened on should not be reused.
    pub fn spoils_connection(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::ReadOnly(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("25006") => StoreError::ReadOnly(error),
                Some(code)
                    if code.starts_with("08")
                        || code.starts_with("53")
                        || matches!(code, "57P01" | "57P02" | "57P03") =>
                {
                    StoreError::Unavailable(error)
                }
                Some("40001" | "40P01" | "55P03" | "57014") => StoreError::Contention(error),
                Some("42501") => StoreError::PermissionDenied(error),
                _ => StoreError::Permanent(error),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error),
            _ => StoreError::Permanent(error),
        }
    }
}
