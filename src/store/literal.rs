//! SQL literals for the statements the worker sends as one simple query, and
//! [`scalar`], which sends one.
//!
//! Behind PgBouncer in transaction pooling mode a server connection is lent for
//! one transaction at a time, and sqlx's extended protocol parses a statement in
//! one round trip and runs it in the next, after a `Sync` that lets PgBouncer
//! hand the session to another client. A prepared statement, named or unnamed,
//! can then be missing on the server that runs it. A simple query is parsed and
//! run in one message, so the worker's statements outside an explicit
//! transaction are sent that way, with their values written in as literals.
//!
//! Every value is escaped here and nowhere else. Text goes into an escape string
//! (`E'…'`), whose meaning does not depend on `standard_conforming_strings`:
//! a backslash and a quote are doubled, everything else stands as it is. NUL is
//! the one character PostgreSQL text cannot hold; decoding refuses it in a
//! `message_id`, and here it is dropped rather than allowed to cut the query short.

use sqlx::PgConnection;
use std::fmt::Write as _;
use uuid::Uuid;

/// `E'…'`: `value` as a text literal.
pub fn text(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    push_text(&mut out, value);
    out
}

fn push_text(out: &mut String, value: &str) {
    out.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// `"…"`: `name` as a quoted identifier (a role's name, say).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\0', "").replace('"', "\"\""))
}

/// `array[E'…', …]::text[]`, with `null` for `None`.
pub fn text_array<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut out = String::from("array[");
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match value {
            Some(value) => push_text(&mut out, value),
            None => out.push_str("null"),
        }
    }
    out.push_str("]::text[]");
    out
}

/// `'{…}'::uuid[]`: a UUID's hyphenated form needs no escaping.
pub fn uuid_array(values: impl IntoIterator<Item = Uuid>) -> String {
    let mut out = String::from("'{");
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write!(out, "{}", value.hyphenated()).expect("writing to a String cannot fail");
    }
    out.push_str("}'::uuid[]");
    out
}

/// `'{…}'::bigint[]`.
pub fn bigint_array(values: impl IntoIterator<Item = i64>) -> String {
    let mut out = String::from("'{");
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write!(out, "{value}").expect("writing to a String cannot fail");
    }
    out.push_str("}'::bigint[]");
    out
}

/// The first column of the one row `sql` answers, asked as a simple query (no
/// prepared statement, so PgBouncer's transaction pooling cannot lose it).
pub(crate) async fn scalar<T>(connection: &mut PgConnection, sql: &str) -> Result<T, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    use sqlx::Row as _;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(connection)
        .await?
        .try_get(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_backslashes_are_doubled_and_nothing_else_changes() {
        assert_eq!(text("k-42"), "E'k-42'");
        assert_eq!(text("it's"), "E'it''s'");
        assert_eq!(text(r"a\'b"), r"E'a\\''b'");
        assert_eq!(
            text("'); drop table items; --"),
            "E'''); drop table items; --'"
        );
        assert_eq!(text("héllo\n\t✓"), "E'héllo\n\t✓'");
        assert_eq!(text("a\0b"), "E'ab'");
    }

    #[test]
    fn identifiers_double_their_quotes() {
        assert_eq!(ident("qty_runtime"), "\"qty_runtime\"");
        assert_eq!(ident("a\"b; drop"), "\"a\"\"b; drop\"");
    }

    #[test]
    fn arrays_keep_order_and_nulls() {
        assert_eq!(
            text_array([Some("a"), None, Some("o'k")]),
            "array[E'a',null,E'o''k']::text[]"
        );
        assert_eq!(text_array([]), "array[]::text[]");
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(
            uuid_array([id, id]),
            "'{01234567-89ab-cdef-0123-456789abcdef,01234567-89ab-cdef-0123-456789abcdef}'::uuid[]"
        );
        assert_eq!(
            bigint_array([i64::MIN, 0, i64::MAX]),
            "'{-9223372036854775808,0,9223372036854775807}'::bigint[]"
        );
    }
}
