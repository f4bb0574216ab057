//! `qty-worker item create|show|list`.

use super::{EXIT_NOT_FOUND, Output, database};
use crate::cli::ItemCommand;
use crate::settings::Connections;
use crate::store::{self, Item};
use anyhow::Context as _;
use std::process::ExitCode;
use uuid::Uuid;

pub async fn run(
    connections: &Connections,
    command: ItemCommand,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let pool = database(connections).await?;
    match command {
        ItemCommand::Create { id, qty } => {
            let id = id.unwrap_or_else(Uuid::new_v4);
            let item = store::create_item(&pool, id, qty)
                .await
                .with_context(|| format!("cannot create item {id} (does it exist already?)"))?;
            output.print(&item, human);
        }
        ItemCommand::Show { id } => match store::find_item(&pool, id).await? {
            Some(item) => output.print(&item, human),
            None => {
                eprintln!("item {id} not found");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            }
        },
        ItemCommand::List { limit } => {
            let items = store::list_items(&pool, limit).await?;
            output.print(&items, |items| {
                let mut text = format!("{:<36}  {:>20}", "id", "qty");
                for item in items {
                    text.push('\n');
                    text.push_str(&human(item));
                }
                text
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(item: &Item) -> String {
    format!("{:<36}  {:>20}", item.id, item.qty)
}
