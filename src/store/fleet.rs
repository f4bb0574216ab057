//! The fleet's queries (migration 0006): membership, and the partition leases
//! that decide which worker consumes which partition queue (contract §3). Sent
//! as simple queries with their values written in (see `literal`), so they work
//! behind PgBouncer's transaction pooling, where each is a transaction of its own.

use super::StoreError;
use super::database::Database;
use super::literal;
use sqlx::Row as _;
use std::time::Duration;

/// What one tick saw: the live members, in order, each partition's owner
/// (`None` when free or expired), and which free ones lapsed (their owner
/// stopped renewing) rather than were given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetView {
    pub members: Vec<String>,
    pub owners: Vec<Option<String>>,
    pub lapsed: Vec<bool>,
}

/// The fleet's name in the tables: the request queue's name.
#[derive(Debug, Clone)]
pub struct Fleet {
    db: Database,
    name: String,
    member: String,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Fleet {
    pub fn new(db: Database, name: &str, member: &str) -> Fleet {
        Fleet {
            db,
            name: name.to_owned(),
            member: member.to_owned(),
        }
    }

    /// This worker's id in the tables.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// Keeps this worker a member for `ttl` and reads the fleet.
    pub async fn tick(&self, partitions: u16, ttl: Duration) -> Result<FleetView, StoreError> {
        let sql = format!(
            "select members, partition, owner, lapsed from qty_fleet_tick({}, {}, {partitions}, {})",
            literal::text(&self.name),
            literal::text(&self.member),
            millis(ttl)
        );
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.db.pool)
            .await?;
        let mut view = FleetView {
            members: Vec::new(),
            owners: vec![None; usize::from(partitions)],
            lapsed: vec![false; usize::from(partitions)],
        };
        for row in rows {
            view.members = row
                .try_get::<Option<Vec<String>>, _>(0)?
                .unwrap_or_default();
            let partition: i32 = row.try_get(1)?;
            if let Ok(p) = usize::try_from(partition)
                && p < view.owners.len()
            {
                view.owners[p] = row.try_get(2)?;
                view.lapsed[p] = row.try_get(3)?;
            }
        }
        Ok(view)
    }

    /// Claims `partition` for `ttl` if it is free or expired: its new epoch.
    pub async fn claim(&self, partition: u16, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "select qty_lease_claim({}, {partition}, {}, {})",
            literal::text(&self.name),
            literal::text(&self.member),
            millis(ttl)
        );
        let mut connection = self.db.pool.acquire().await?;
        Ok(literal::scalar(&mut connection, &sql).await?)
    }

    /// Renews the leases held, as `(partition, epoch)`, for `ttl`: the
    /// partitions still held (any other was lost to another worker).
    pub async fn renew(&self, held: &[(u16, i64)], ttl: Duration) -> Result<Vec<u16>, StoreError> {
        let sql = format!(
            "select qty_lease_renew({}, {}, {}::int[], {}, {})",
            literal::text(&self.name),
            literal::text(&self.member),
            literal::bigint_array(held.iter().map(|(p, _)| i64::from(*p))),
            literal::bigint_array(held.iter().map(|(_, epoch)| *epoch)),
            millis(ttl)
        );
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let partition: i32 = row.try_get(0)?;
                Ok(u16::try_from(partition).unwrap_or(u16::MAX))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Gives `partition` up, if still held at `epoch`.
    pub async fn release(&self, partition: u16, epoch: i64) -> Result<bool, StoreError> {
        let sql = format!(
            "select qty_lease_release({}, {}, {partition}, {epoch})",
            literal::text(&self.name),
            literal::text(&self.member),
        );
        let mut connection = self.db.pool.acquire().await?;
        Ok(literal::scalar(&mut connection, &sql).await?)
    }

    /// Leaves the fleet at once (a stop), rather than when membership expires.
    pub async fn leave(&self) -> Result<(), StoreError> {
        let sql = format!(
            "select qty_fleet_leave({}, {})",
            literal::text(&self.name),
            literal::text(&self.member),
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}
