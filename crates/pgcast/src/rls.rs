//! Row-level security checks for tables in `mode = "rls"`: PostgreSQL itself decides whether
//! each candidate subscriber may see a changed row, with the subscriber's role and claims set
//! the way Supabase sets them (`SET ROLE`, `request.jwt.claims`).
//!
//! One query per change answers for all its candidates: the `pgcast.rls_visible` function loops
//! over the distinct (role, claims) pairs inside the database. It checks the row as it is now
//! (by primary key), not as the WAL recorded it. This is the one place the routing path waits on
//! the database, and only for RLS-mode tables; failures hide the change (fail closed).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::capture::{Change, Row};
use crate::db::{Db, DbError};
use crate::router::policy::RlsIdentity;

pub struct RlsChecker {
    db: Arc<Db>,
}

/// Installs the checking function (idempotent).
pub async fn ensure_function(db: &Db) -> Result<(), DbError> {
    db.client()
        .await?
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS pgcast;
             CREATE OR REPLACE FUNCTION pgcast.rls_visible(rel regclass, pk jsonb, roles text[], claims text[])
             RETURNS boolean[] LANGUAGE plpgsql AS $$
             DECLARE
                 cond text;
                 visible boolean;
                 result boolean[] := '{}';
             BEGIN
                 SELECT string_agg(format('%I = %L', key, value), ' AND ') INTO cond FROM jsonb_each_text(pk);
                 FOR i IN 1 .. coalesce(array_length(roles, 1), 0) LOOP
                     PERFORM set_config('request.jwt.claims', claims[i], true);
                     PERFORM set_config('request.jwt.claim.sub', coalesce(claims[i]::jsonb ->> 'sub', ''), true);
                     EXECUTE format('SET LOCAL ROLE %I', roles[i]);
                     EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %s)', rel, cond) INTO visible;
                     RESET ROLE;
                     result := result || visible;
                 END LOOP;
                 RETURN result;
             END $$;",
        )
        .await?;
    Ok(())
}

impl RlsChecker {
    pub fn new(db: Arc<Db>) -> RlsChecker {
        RlsChecker { db }
    }

    /// For each identity, whether row-level security lets it select the changed row.
    pub async fn visible(
        &self,
        change: &Change,
        primary_key: &[String],
        identities: &[Arc<RlsIdentity>],
    ) -> Result<Vec<bool>, DbError> {
        let Some(row) = change.new.as_ref().or(change.old.as_ref()) else {
            return Ok(vec![false; identities.len()]);
        };
        let relation = &change.relation;
        let qualified = format!(
            "{}.{}",
            crate::capture::publication::quote_ident(&relation.schema),
            crate::capture::publication::quote_ident(&relation.name)
        );
        let pk = key_object(row, change, primary_key);
        let roles: Vec<&str> = identities.iter().map(|i| i.role.as_str()).collect();
        let claims: Vec<&str> = identities.iter().map(|i| i.claims.as_str()).collect();
        let client = self.db.client().await?;
        let started = std::time::Instant::now();
        let row = client
            .query_one(
                "SELECT pgcast.rls_visible($1::text::regclass, $2::text::jsonb, $3, $4)",
                &[&qualified, &pk.to_string(), &roles, &claims],
            )
            .await?;
        metrics::histogram!("pgcast_rls_check_seconds").record(started.elapsed().as_secs_f64());
        Ok(row.get(0))
    }
}

fn key_object(row: &Row, change: &Change, primary_key: &[String]) -> Value {
    let mut pk = Map::new();
    for name in primary_key {
        if let Some(index) = change.relation.column_index(name) {
            let value = row.text(index).map(|t| Value::String(t.to_string())).unwrap_or(Value::Null);
            pk.insert(name.clone(), value);
        }
    }
    Value::Object(pk)
}
