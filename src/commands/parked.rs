//! `qty-worker parked`: the requests parked for locked items, per item in the
//! order they will be judged, with how long each has waited. Exit 0 whether or
//! not any wait.

use super::{Output, database};
use crate::settings::DatabaseArgs;
use crate::store::parked;
use std::process::ExitCode;

pub async fn run(
    database_args: &DatabaseArgs,
    limit: i64,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let pool = database(database_args).await?;
    let entries = parked::list(&pool, limit).await?;
    output.print_rows(&entries, |entries| {
        if entries.is_empty() {
            return "no parked requests: nothing waits for a locked item".to_owned();
        }
        let mut text = format!(
            "{:<36}  {:<36}  {:>8}  {:>10}  {:<7}  {}",
            "item_id", "message_id", "delta", "waited_s", "state", "source"
        );
        let mut item = None;
        for e in entries {
            if item.is_some_and(|i| i != e.item_id) {
                text.push('\n');
            }
            item = Some(e.item_id);
            text.push_str(&format!(
                "\n{:<36}  {:<36}  {:>8}  {:>10.1}  {:<7}  {}",
                e.item_id, e.message_id, e.delta, e.waited_seconds, e.state, e.source
            ));
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}
