//! `DATABASE_URL` in libpq's multi-host form, and finding the host to write to.
//!
//! `postgres://user@h1:5432,h2:5432/db?target_session_attrs=read-write` names
//! several hosts; every new connection tries them in order and keeps the first
//! that satisfies the attribute, as libpq, pgx and Npgsql do. That is how the
//! worker follows a failover: the old primary refuses or turns read-only, the
//! promoted standby accepts writes. sqlx parses single-host URLs only, so each
//! host becomes a single-host URL of its own, with every other part kept.
//!
//! `statement-cache-capacity=0` (sqlx's own parameter) says that connections
//! must keep no prepared statement: a pooler in transaction mode that does not
//! keep them (PgBouncer 1.18) is in the way. The hot path then sends simple
//! queries instead (see `adjust`).

use crate::redact::redact;
use crate::settings::SettingError;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What a connection must be to be kept (`target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// Any server that answers (libpq's default with one host).
    Any,
    /// A server whose sessions accept writes (the default with several hosts).
    ReadWrite,
    /// A server not in recovery.
    Primary,
}

impl SessionAttrs {
    fn parse(value: &str) -> Result<SessionAttrs, SettingError> {
        match value {
            "any" => Ok(SessionAttrs::Any),
            "read-write" => Ok(SessionAttrs::ReadWrite),
            "primary" => Ok(SessionAttrs::Primary),
            other => Err(SettingError::new(
                "DATABASE_URL",
                format!(
                    "has target_session_attrs={other:?}; the worker writes, so it takes any, read-write or primary"
                ),
            )),
        }
    }
}

/// Why no host could be used.
#[derive(Debug, thiserror::Error)]
#[error("no PostgreSQL host is usable: {0}")]
pub struct NoHost(pub String);

/// The parsed `DATABASE_URL`: its hosts in order and the attribute to keep.
#[derive(Debug)]
pub struct Target {
    hosts: Vec<(String, PgConnectOptions)>,
    pub attrs: SessionAttrs,
    /// Whether connections may keep prepared statements (unless the URL has
    /// `statement-cache-capacity=0`).
    pub prepared_statements: bool,
    /// The URL with its password hidden, for messages.
    pub shown: String,
    /// The host new connections go to: the last one found usable.
    current: AtomicUsize,
}

/// How long one host may take to accept a connection while looking for one.
const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    pub fn parse(url: &str) -> Result<Target, SettingError> {
        let shown = redact(url);
        let invalid =
            |why: &str| SettingError::new("DATABASE_URL", format!("{shown:?} is not valid: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected postgres://user@host:port/database"))?;
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(invalid("the scheme must be postgres:// or postgresql://"));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut attrs = None;
        let mut prepared_statements = true;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| match pair.split_once('=') {
                Some(("target_session_attrs", value)) => {
                    attrs = Some(value.to_owned());
                    false
                }
                // Passed on: sqlx's own statement cache obeys it too.
                Some(("statement-cache-capacity", value)) => {
                    prepared_statements = value.trim() != "0";
                    true
                }
                _ => true,
            })
            .collect();
        let hosts: Vec<&str> = host_list.split(',').collect();
        let attrs = match attrs {
            Some(value) => SessionAttrs::parse(&value)?,
            None if hosts.len() > 1 => SessionAttrs::ReadWrite,
            None => SessionAttrs::Any,
        };
        let mut parsed = Vec::with_capacity(hosts.len());
        for host in hosts {
            if host.is_empty() && host_list.contains(',') {
                return Err(invalid("a host in the list is empty"));
            }
            let single = format!(
                "{scheme}://{}{host}{path}{}{}",
                userinfo.map(|u| format!("{u}@")).unwrap_or_default(),
                if kept.is_empty() { "" } else { "?" },
                kept.join("&")
            );
            let mut options =
                PgConnectOptions::from_str(&single).map_err(|e| invalid(&e.to_string()))?;
            // An IPv6 literal keeps its URL brackets in sqlx's parse, which the
            // socket address then cannot resolve.
            if let Some(ip) = options
                .get_host()
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
            {
                let ip = ip.to_owned();
                options = options.host(&ip);
            }
            let name = if host.is_empty() { "localhost" } else { host };
            parsed.push((name.to_owned(), options));
        }
        Ok(Target {
            hosts: parsed,
            attrs,
            prepared_statements,
            shown,
            current: AtomicUsize::new(0),
        })
    }

    /// The options new connections use: those of the host last found usable.
    pub fn options(&self) -> PgConnectOptions {
        self.hosts[self.current.load(Ordering::Relaxed)].1.clone()
    }

    pub fn database(&self) -> String {
        self.hosts[0]
            .1
            .get_database()
            .unwrap_or("postgres")
            .to_owned()
    }

    /// Several hosts, or an attribute to check: worth looking for another host
    /// when the current one fails.
    pub fn can_move(&self) -> bool {
        self.hosts.len() > 1 || self.attrs != SessionAttrs::Any
    }

    /// The host new connections go to, as `host:port`.
    pub fn current_host(&self) -> &str {
        &self.hosts[self.current.load(Ordering::Relaxed)].0
    }

    /// Tries the hosts in order and returns a connection to the first that
    /// satisfies the attribute, in the database `database` (the target's own when
    /// `None`); it becomes the host new connections go to.
    pub async fn locate(&self, database: Option<&str>) -> Result<PgConnection, NoHost> {
        let mut refusals = Vec::new();
        for (index, (name, options)) in self.hosts.iter().enumerate() {
            let options = match database {
                Some(database) => options.clone().database(database),
                None => options.clone(),
            };
            let attempt = tokio::time::timeout(HOST_CONNECT_TIMEOUT, options.connect()).await;
            let mut connection = match attempt {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    refusals.push(format!("{name}: {}", describe(&error)));
                    continue;
                }
                Err(_) => {
                    refusals.push(format!("{name}: no answer within {HOST_CONNECT_TIMEOUT:?}"));
                    continue;
                }
            };
            match self.satisfied_by(&mut connection).await {
                Ok(true) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(connection);
                }
                Ok(false) => refusals.push(format!("{name}: {}", self.refusal())),
                Err(error) => refusals.push(format!("{name}: {}", describe(&error))),
            }
            connection.close().await.ok();
        }
        Err(NoHost(refusals.join("; ")))
    }

    /// Whether `connection` satisfies the attribute.
    pub async fn satisfied_by(&self, connection: &mut PgConnection) -> Result<bool, sqlx::Error> {
        let check = match self.attrs {
            SessionAttrs::Any => return Ok(true),
            SessionAttrs::ReadWrite => "select current_setting('transaction_read_only') = 'off'",
            SessionAttrs::Primary => "select not pg_is_in_recovery()",
        };
        super::literal::scalar(connection, check).await
    }

    fn refusal(&self) -> &'static str {
        match self.attrs {
            SessionAttrs::Primary => "in recovery (a standby)",
            _ => "read-only",
        }
    }
}

/// A database error's message alone: sqlx's own wording repeats it with where in
/// sqlx it was raised.
pub fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_port(target: &Target, n: usize) -> (String, u16) {
        let options = &target.hosts[n].1;
        (options.get_host().to_owned(), options.get_port())
    }

    #[test]
    fn a_single_host_url_keeps_libpqs_default_of_any() {
        let target =
            Target::parse("postgres://u:pw@db:6543/inventory?sslmode=prefer").expect("parses");
        assert_eq!(target.attrs, SessionAttrs::Any);
        assert_eq!(host_port(&target, 0), ("db".into(), 6543));
        assert_eq!(target.database(), "inventory");
        assert!(!target.can_move());
    }

    #[test]
    fn several_hosts_are_tried_in_order_and_want_read_write_by_default() {
        let target = Target::parse("postgres://u:pw@h1:5432,h2:5433,h3/inv").expect("parses");
        assert_eq!(target.attrs, SessionAttrs::ReadWrite);
        assert_eq!(host_port(&target, 0), ("h1".into(), 5432));
        assert_eq!(host_port(&target, 1), ("h2".into(), 5433));
        assert_eq!(host_port(&target, 2), ("h3".into(), 5432));
        assert!(
            target
                .hosts
                .iter()
                .all(|(_, o)| o.get_database() == Some("inv"))
        );
        assert!(target.hosts.iter().all(|(_, o)| o.get_username() == "u"));
        assert_eq!(target.shown, "postgres://u:***@h1:5432,h2:5433,h3/inv");
    }

    #[test]
    fn target_session_attrs_is_read_and_not_passed_on() {
        let target = Target::parse(
            "postgresql://u@[::1]:5432,h2/inv?target_session_attrs=primary&application_name=x",
        )
        .expect("parses");
        assert_eq!(target.attrs, SessionAttrs::Primary);
        assert_eq!(host_port(&target, 0), ("::1".into(), 5432));
        assert_eq!(target.hosts[1].1.get_application_name(), Some("x"));
        let any = Target::parse("postgres://h1,h2/inv?target_session_attrs=any").expect("parses");
        assert_eq!(any.attrs, SessionAttrs::Any);
    }

    #[test]
    fn a_statement_cache_of_zero_turns_prepared_statements_off() {
        let direct = Target::parse("postgres://u@h1/inv").expect("parses");
        assert!(direct.prepared_statements);
        let pooled =
            Target::parse("postgres://u@h1:6432/inv?statement-cache-capacity=0").expect("parses");
        assert!(!pooled.prepared_statements);
        let cached =
            Target::parse("postgres://u@h1/inv?statement-cache-capacity=10").expect("parses");
        assert!(cached.prepared_statements);
    }

    #[test]
    fn what_can_never_work_names_the_setting() {
        for bad in [
            "mysql://root@h/x",
            "postgres://h1,,h2/inv",
            "postgres://h1:notaport/inv",
            "postgres://h1/inv?target_session_attrs=standby",
            "localhost:5432",
        ] {
            let error = Target::parse(bad).expect_err("refused");
            assert_eq!(error.setting, "DATABASE_URL", "{bad}");
        }
        let error = Target::parse("postgres://u:secret@h1:x/inv").expect_err("refused");
        assert!(!error.message.contains("secret"), "{error}");
    }
}
