//! `qty-worker ledger ITEM`: an item's adjustment history, newest first.

use super::{Output, database};
use crate::settings::DatabaseArgs;
use crate::store;
use std::process::ExitCode;
use uuid::Uuid;

pub async fn run(
    database_args: &DatabaseArgs,
    item: Uuid,
    limit: i64,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let pool = database(database_args).await?;
    let entries = store::item_history(&pool, item, limit).await?;
    output.print_rows(&entries, |entries| {
        let mut text = format!(
            "{:<30}  {:<36}  {:>8}  {:<9}  {:<18}  {:>10}  {}",
            "recorded_at", "message_id", "delta", "outcome", "reason", "qty_after", "publisher"
        );
        for e in entries {
            text.push_str(&format!(
                "\n{:<30}  {:<36}  {:>8}  {:<9}  {:<18}  {:>10}  {}",
                e.recorded_at,
                e.message_id,
                e.delta,
                e.outcome,
                e.reason.as_deref().unwrap_or("-"),
                e.qty_after.map_or("-".to_owned(), |q| q.to_string()),
                e.publisher.as_deref().unwrap_or("-"),
            ));
        }
        if entries.is_empty() {
            text.push_str("\n(no adjustments recorded for this item)");
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}
