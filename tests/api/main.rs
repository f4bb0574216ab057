//! Integration tests against the real RabbitMQ and PostgreSQL, driven through the
//! broker as a publisher would. Each test has its own database and names.

mod batching;
mod binary;
mod blocked;
mod brokers;
mod confirms;
mod deploy;
mod dev;
mod direct_reply_to;
mod invalid;
mod leaders;
mod least_privilege;
mod ledger;
mod locks;
#[cfg(feature = "otlp")]
mod otlp;
mod outcomes;
mod partitions;
mod publishers;
mod refused_replies;
mod replies;
mod tls;
mod topology;
mod who_may_adjust;
