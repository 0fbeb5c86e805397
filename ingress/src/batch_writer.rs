//! One database call for many requests' small writes.
//!
//! A write that each request commits on its own waits for the database's
//! flush, so a handler doing one per request is held near the single-row
//! commit rate. A [`BatchWriter`] hands every item to one task that runs
//! whatever has accumulated as a single call (one statement, one commit) and
//! then answers each caller with its own item's result.

use conveyor_schema::pool::PgPool;
use diesel::{PgConnection, QueryResult};
use tokio::sync::{mpsc, oneshot};

type Reply<R> = oneshot::Sender<Result<R, String>>;

/// Queues items for the writer task. Cheap to clone.
pub struct BatchWriter<T, R> {
    tx: mpsc::UnboundedSender<(T, Reply<R>)>,
}

impl<T, R> Clone for BatchWriter<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> BatchWriter<T, R> {
    /// Starts the writer task: `write` gets up to `max` items and returns one
    /// result per item, in order. The task ends once every writer is dropped
    /// and the queue is empty.
    pub fn start<W>(db: PgPool, max: usize, write: W) -> Self
    where
        W: Fn(&mut PgConnection, Vec<T>) -> QueryResult<Vec<R>> + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(T, Reply<R>)>();
        let write = std::sync::Arc::new(write);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                let (items, replies): (Vec<T>, Vec<Reply<R>>) = batch.drain(..).unzip();
                let write = write.clone();
                let written = conveyor_schema::pool::run(&db, move |conn| write(conn, items)).await;
                let results = match written {
                    Ok(results) if results.len() == replies.len() => Ok(results),
                    Ok(results) => Err(format!(
                        "{} results for {} items",
                        results.len(),
                        replies.len()
                    )),
                    Err(err) => Err(err.to_string()),
                };
                match results {
                    Ok(results) => {
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Err(err) => {
                        for reply in replies {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Writes `item` with whatever else is waiting; returns its result once
    /// the call holding it has finished.
    pub async fn write(&self, item: T) -> Result<R, String> {
        let (reply, result) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| "the batch writer has stopped".to_owned())?;
        result
            .await
            .unwrap_or_else(|_| Err("the batch writer has stopped".into()))
    }
}
