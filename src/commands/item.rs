//! `qty-worker item create|show|list`.

use super::{EXIT_NOT_FOUND, Output, database};
use crate::cli::ItemCommand;
use crate::store::{self, Item};
use anyhow::Context as _;
use std::process::ExitCode;
use uuid::Uuid;

pub async fn run(command: ItemCommand) -> anyhow::Result<ExitCode> {
    match command {
        ItemCommand::Create {
            id,
            qty,
            json,
            database: args,
        } => {
            let pool = database(&args).await?;
            let output = Output::choose(json.json);
            let id = id.unwrap_or_else(Uuid::new_v4);
            let item = store::create_item(&pool, id, qty)
                .await
                .with_context(|| format!("cannot create item {id} (does it exist already?)"))?;
            output.print(&item, human);
        }
        ItemCommand::Show {
            id,
            json,
            database: args,
        } => {
            let pool = database(&args).await?;
            match store::find_item(&pool, id).await? {
                Some(item) => Output::choose(json.json).print(&item, human),
                None => {
                    eprintln!("item {id} not found");
                    return Ok(ExitCode::from(EXIT_NOT_FOUND));
                }
            }
        }
        ItemCommand::List {
            limit,
            json,
            database: args,
        } => {
            let pool = database(&args).await?;
            let items = store::list_items(&pool, limit).await?;
            Output::choose(json.json).print_rows(&items, |items| {
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
