//! Least privilege on RabbitMQ (contract §9): the `rabbitmqctl set_permissions`
//! regexes (configure, write, read) a worker's user needs for its own names, and
//! those a publisher's user needs. docs/security.md shows them for the default names;
//! the tests run the worker with exactly these.

use super::Topology;

/// One user's permissions on a vhost, as `rabbitmqctl set_permissions` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Permissions {
    /// What the worker does, and nothing more:
    /// - configure: declare its exchange, dead-letter exchange, queue and
    ///   dead-letter queue (again, when someone deletes them);
    /// - write: publish reply events to its exchange and replies to any
    ///   `reply_to` (through the default exchange, `amq.default`); bind its queue
    ///   and its dead-letter queue, and declare the queue with the dead-letter
    ///   exchange as its target;
    /// - read: consume its queue, bind from its exchange and its dead-letter
    ///   exchange.
    ///
    /// Partitioned, the same for the hash exchange `<exchange>.by-item` (bound
    /// from the exchange, bound to by the partitions) and the partition queues
    /// `<queue>.N`; the unpartitioned `<queue>` stays, since switching drains it.
    pub fn worker(topology: &Topology) -> Permissions {
        let (exchange, dlx) = (&topology.exchange, &topology.dead_letter_exchange);
        let (queue, dead) = (&topology.queue, &topology.dead_letter_queue);
        if topology.partitions.is_none() {
            return Permissions {
                configure: any_of(&[exchange, dlx, queue, dead]),
                write: any_of(&[exchange, dlx, "amq.default", queue, dead]),
                read: any_of(&[exchange, dlx, queue]),
            };
        }
        let by_item = escape(&topology.by_item_exchange);
        let partitions = format!("{}\\.[0-9]+", escape(queue));
        let with = |names: &[&str]| {
            let listed = any_of(names);
            format!("{}|{by_item}|{partitions})$", &listed[..listed.len() - 2])
        };
        Permissions {
            configure: with(&[exchange, dlx, queue, dead]),
            write: with(&[exchange, dlx, "amq.default", queue, dead]),
            read: with(&[exchange, dlx, queue]),
        }
    }

    /// A publisher that sends requests to `exchange` and hears replies on
    /// server-named queues of its own (or on direct reply-to, which needs none).
    pub fn publisher(exchange: &str) -> Permissions {
        Permissions {
            configure: "^amq\\.gen-.*$".into(),
            write: format!("^({}|amq\\.gen-.*)$", escape(exchange)),
            read: "^amq\\.gen-.*$".into(),
        }
    }

    /// The arguments after `rabbitmqctl set_permissions -p VHOST USER`.
    pub fn args(&self) -> [&str; 3] {
        [&self.configure, &self.write, &self.read]
    }
}

/// `^(a|b|…)$`, each name matched literally.
fn any_of(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| escape(n)).collect();
    format!("^({})$", names.join("|"))
}

/// A name as a regex that matches only itself.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_security_page_shows_the_permissions_of_the_default_names() {
        let page = include_str!("../../docs/security.md");
        let topology = Topology::new("inventory", "qty.adjust", 10);
        let worker = Permissions::worker(&topology);
        let partitioned = Permissions::worker(&topology.clone().partitioned(Some(8)));
        let publisher = Permissions::publisher("inventory");
        for (user, permissions) in [
            ("qty-worker", worker),
            ("qty-worker", partitioned),
            ("orders", publisher),
        ] {
            let command = format!(
                "rabbitmqctl set_permissions -p / {user} \\\n  '{}' \\\n  '{}' \\\n  '{}'",
                permissions.configure, permissions.write, permissions.read
            );
            assert!(
                page.contains(&command),
                "docs/security.md lacks:\n{command}"
            );
        }
    }

    #[test]
    fn a_partitioned_worker_may_also_use_the_hash_exchange_and_the_partition_queues() {
        let topology = Topology::new("inventory", "qty.adjust", 10).partitioned(Some(8));
        let worker = Permissions::worker(&topology);
        assert_eq!(
            worker.configure,
            "^(inventory|inventory\\.dlx|qty\\.adjust|qty\\.adjust\\.dead|inventory\\.by-item|qty\\.adjust\\.[0-9]+)$"
        );
        assert!(worker.write.contains("|amq\\.default|"), "{}", worker.write);
        assert!(
            worker
                .read
                .ends_with("|inventory\\.by-item|qty\\.adjust\\.[0-9]+)$")
        );
    }

    #[test]
    fn names_match_only_themselves() {
        assert_eq!(escape("qty.adjust"), "qty\\.adjust");
        assert_eq!(any_of(&["a.b", "c+d"]), "^(a\\.b|c\\+d)$");
    }
}
