//! Stage 2 of the flow, before decoding touches the body: who may adjust
//! (contract §1, §4). With `QTY_PUBLISHERS` set, only a request whose `user_id`
//! property names a listed RabbitMQ user is served. The broker refuses a publish
//! whose `user_id` differs from the user its connection authenticated as, so a
//! present `user_id` is the publisher's identity, not a claim.
//!
//! A refused request is answered `rejected` / `forbidden` and acked, and nothing
//! of it reaches the database: a stranger learns nothing about the items, and
//! claims no `message_id` that an allowed publisher may use later.

use std::collections::HashSet;

/// The publishers allowed to adjust; everyone when the setting is unset.
#[derive(Debug, Clone, Default)]
pub struct Publishers(Option<HashSet<String>>);

/// Why a request may not adjust. The text is the reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error("user_id {0:?} is not allowed to adjust")]
    NotListed(String),
    #[error("the request has no user_id; only listed publishers may adjust")]
    Anonymous,
}

/// Quoted in an error at most this many characters, as every quote of a request.
const QUOTED_CHARS: usize = 100;

impl Publishers {
    /// From `QTY_PUBLISHERS`: comma-separated user names (the setting has
    /// checked that none is empty).
    pub fn from_setting(list: Option<&str>) -> Publishers {
        Publishers(list.map(|list| list.split(',').map(|name| name.trim().to_owned()).collect()))
    }

    /// Whether a request with this `user_id` may adjust.
    pub fn admit(&self, user_id: Option<&str>) -> Result<(), Forbidden> {
        let Some(allowed) = &self.0 else {
            return Ok(());
        };
        match user_id {
            Some(user) if allowed.contains(user) => Ok(()),
            Some(user) => Err(Forbidden::NotListed(
                user.chars().take(QUOTED_CHARS).collect(),
            )),
            None => Err(Forbidden::Anonymous),
        }
    }

    /// Whether a list is set (for the start-up log line).
    pub fn restricted(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_admits_everyone_with_or_without_a_user_id() {
        let everyone = Publishers::from_setting(None);
        assert_eq!(everyone.admit(Some("anyone")), Ok(()));
        assert_eq!(everyone.admit(None), Ok(()));
        assert!(!everyone.restricted());
    }

    #[test]
    fn a_list_admits_only_its_users_exactly() {
        let listed = Publishers::from_setting(Some("orders, returns"));
        assert_eq!(listed.admit(Some("orders")), Ok(()));
        assert_eq!(listed.admit(Some("returns")), Ok(()));
        assert_eq!(
            listed.admit(Some("Orders")),
            Err(Forbidden::NotListed("Orders".into()))
        );
        assert_eq!(
            listed.admit(Some("")),
            Err(Forbidden::NotListed(String::new()))
        );
        assert_eq!(listed.admit(None), Err(Forbidden::Anonymous));
    }

    #[test]
    fn the_error_quotes_at_most_100_characters_of_the_user_id() {
        let listed = Publishers::from_setting(Some("orders"));
        let long = "é".repeat(300);
        let error = listed
            .admit(Some(&long))
            .expect_err("forbidden")
            .to_string();
        assert!(error.contains(&"é".repeat(100)), "{error}");
        assert!(!error.contains(&"é".repeat(101)), "{error}");
    }
}
