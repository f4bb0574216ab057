//! Passwords out of URLs, for every log line and error message that shows one.
//! A setting may hold several URLs (`AMQP_URL`, comma-separated) or one URL with
//! several hosts (`DATABASE_URL`, libpq's multi-host form); both are handled.

/// The text with the password of every URL in it replaced by `***`.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// One URL, or one piece of a comma-separated list. A piece without `://` is a
/// further host of a multi-host URL, which carries no credentials.
fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn only_the_password_is_hidden() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(
            redact("postgres://u:p@ss@h/db?x=1"),
            "postgres://u:***@h/db?x=1"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn every_url_of_a_list_is_redacted() {
        assert_eq!(
            redact("amqp://a:one@n1:5672/%2f,amqp://b:two@n2:5672/%2f,amqps://c:three@n3/v"),
            "amqp://a:***@n1:5672/%2f,amqp://b:***@n2:5672/%2f,amqps://c:***@n3/v"
        );
    }

    #[test]
    fn a_multi_host_database_url_keeps_its_hosts() {
        assert_eq!(
            redact("postgres://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write"),
            "postgres://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write"
        );
    }
}
