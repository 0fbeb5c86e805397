//! Hand-written SQL that PostgreSQL parses and plans once per connection.
//!
//! Diesel keeps a prepared statement per connection for queries built with its
//! DSL, but never for `sql_query`: it cannot know the text is constant, so
//! every execution sends an unnamed statement that the server parses,
//! analyses and plans again. For the hot multi-row statements (the ingress's
//! group-commit insert, the worker's state upsert) that was about a fifth of
//! the database's CPU under load; for the mail sender's claim and record, run
//! once per group of recipients, about a sixth of it in a fan-out. Such a
//! statement is instead a small type whose `QueryFragment` walks a constant
//! SQL text with [`walk_sql`] and whose `QueryId` is static
//! ([`prepared_statement!`](crate::prepared_statement)), so Diesel prepares it
//! once per connection and afterwards only binds and executes it.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::AstPass;

/// Walks `sql`, handing each `$n` placeholder (numbered 1, 2, … in order of
/// appearance) to `bind`, which pushes that parameter's value.
///
/// # Errors
/// A placeholder out of order, or `bind`'s error.
pub fn walk_sql<'b>(
    sql: &'static str,
    mut out: AstPass<'_, 'b, Pg>,
    mut bind: impl FnMut(usize, &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>,
) -> QueryResult<()> {
    let mut rest = sql;
    let mut expected = 1;
    while let Some(at) = rest.find('$') {
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        out.push_sql(&rest[..at]);
        if digits == 0 {
            // A `$` that is not a placeholder (none of our statements has one, but be exact).
            out.push_sql("$");
            rest = &rest[at + 1..];
            continue;
        }
        let number: usize = rest[at + 1..at + 1 + digits]
            .parse()
            .map_err(|_| diesel::result::Error::QueryBuilderError("bad placeholder".into()))?;
        if number != expected {
            return Err(diesel::result::Error::QueryBuilderError(
                format!("placeholder ${number} where ${expected} was expected").into(),
            ));
        }
        bind(number, &mut out)?;
        expected += 1;
        rest = &rest[at + 1 + digits..];
    }
    out.push_sql(rest);
    Ok(())
}

/// Gives a statement type (with one lifetime parameter) a static query id, so
/// that Diesel caches it as a prepared statement, and lets it be executed.
/// With `returning rows`, its rows can also be loaded into `QueryableByName`
/// types, as those of a `sql_query` can.
#[macro_export]
macro_rules! prepared_statement {
    ($name:ident) => {
        impl ::diesel::query_builder::QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }
        impl<Conn> ::diesel::RunQueryDsl<Conn> for $name<'_> {}
    };
    ($name:ident, returning rows) => {
        $crate::prepared_statement!($name);
        impl ::diesel::query_builder::Query for $name<'_> {
            type SqlType = ::diesel::sql_types::Untyped;
        }
    };
}

#[cfg(test)]
mod tests {
    use diesel::pg::Pg;
    use diesel::query_builder::{AstPass, QueryFragment};
    use diesel::sql_types::{Array, Int4, Text};

    use super::walk_sql;

    struct Example<'a> {
        numbers: Vec<i32>,
        names: Vec<&'a str>,
    }

    impl QueryFragment<Pg> for Example<'_> {
        fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
            walk_sql(
                "SELECT * FROM unnest($1::int4[], $2::text[]) AS t(number, name) WHERE '$' <> ''",
                out,
                |n, out| match n {
                    1 => out.push_bind_param::<Array<Int4>, _>(&self.numbers),
                    _ => out.push_bind_param::<Array<Text>, _>(&self.names),
                },
            )
        }
    }
    crate::prepared_statement!(Example, returning rows);

    #[test]
    fn placeholders_become_binds_and_the_statement_is_cacheable() {
        let query = Example {
            numbers: vec![1, 2],
            names: vec!["a", "b"],
        };
        let sql = diesel::debug_query::<Pg, _>(&query).to_string();
        assert!(
            sql.starts_with(
                "SELECT * FROM unnest($1::int4[], $2::text[]) AS t(number, name) WHERE '$' <> ''"
            ),
            "{sql}"
        );
        assert!(sql.contains("binds: [[1, 2], [\"a\", \"b\"]]"), "{sql}");
        assert!(QueryFragment::<Pg>::is_safe_to_cache_prepared(&query, &Pg).unwrap());
        assert!(<Example<'_> as diesel::query_builder::QueryId>::query_id().is_some());
    }

    /// The proof against a real server: run twice on one connection (executed,
    /// then its rows loaded), the statement is prepared once and kept
    /// (`pg_prepared_statements` lists it), where a plain `sql_query` leaves
    /// nothing behind.
    #[test]
    fn a_real_connection_prepares_it_once_and_reuses_it() {
        use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        #[derive(QueryableByName, Debug, PartialEq)]
        struct Row {
            #[diesel(sql_type = Int4)]
            number: i32,
            #[diesel(sql_type = Text)]
            name: String,
        }
        let mut conn = PgConnection::establish("postgres://postgres@127.0.0.1:5432/postgres")
            .expect("PostgreSQL at 127.0.0.1:5432 (see README: make services)");
        let prepared = |conn: &mut PgConnection| {
            diesel::sql_query(
                "SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE '%unnest($1::int4[]%'",
            )
            .get_result::<Count>(conn)
            .unwrap()
            .n
        };
        diesel::sql_query("SELECT * FROM unnest($1::int4[], $2::text[]) WHERE '$' <> ''")
            .bind::<Array<Int4>, _>(vec![1])
            .bind::<Array<Text>, _>(vec!["a"])
            .execute(&mut conn)
            .unwrap();
        assert_eq!(prepared(&mut conn), 0, "sql_query is never kept");
        let query = || Example {
            numbers: vec![1, 7],
            names: vec!["one", "seven"],
        };
        assert_eq!(query().execute(&mut conn).unwrap(), 2);
        // Declared `returning rows`, the same statement also loads them.
        let rows: Vec<Row> = query().load(&mut conn).unwrap();
        let row = |number, name: &str| Row {
            number,
            name: name.into(),
        };
        assert_eq!(rows, vec![row(1, "one"), row(7, "seven")]);
        assert_eq!(prepared(&mut conn), 1);
    }

    struct OutOfOrder;
    impl QueryFragment<Pg> for OutOfOrder {
        fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
            walk_sql("SELECT $2", out, |_, _| Ok(()))
        }
    }

    #[test]
    fn a_placeholder_out_of_order_is_an_error() {
        let mut sql = diesel::pg::PgQueryBuilder::default();
        let err = OutOfOrder.to_sql(&mut sql, &Pg).unwrap_err();
        assert!(
            err.to_string()
                .contains("placeholder $2 where $1 was expected"),
            "{err}"
        );
    }
}
