//! The one list of task implementations, and the type erasure that lets the
//! worker call any of them by name.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use conveyor_schema::{TaskDescriptor, TaskOptions, TaskSpec, catalogue::decode_args};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::{JobContext, TaskError, diag, mail, stats, webhooks};

/// A task implementation for the spec `Spec`.
pub trait Task: Send + Sync + 'static {
    /// Name, argument type and options.
    type Spec: TaskSpec;
    /// Runs one attempt.
    fn run(
        &self,
        args: <Self::Spec as TaskSpec>::Args,
        ctx: JobContext,
    ) -> impl Future<Output = Result<(), TaskError>> + Send;
}

/// A task the worker can call with raw JSON arguments.
pub trait ErasedTask: Send + Sync {
    /// The task's catalogue entry.
    fn descriptor(&self) -> &TaskDescriptor;
    /// Decodes `args` and applies the spec's `check_args` (a failure of either
    /// is permanent: the message was published without the ingress's
    /// validation), then runs one attempt.
    fn call(&self, args: Value, ctx: JobContext) -> BoxFuture<'static, Result<(), TaskError>>;
}

struct Erased<T: Task> {
    task: Arc<T>,
    descriptor: TaskDescriptor,
}

impl<T: Task> ErasedTask for Erased<T> {
    fn descriptor(&self) -> &TaskDescriptor {
        &self.descriptor
    }

    fn call(&self, args: Value, ctx: JobContext) -> BoxFuture<'static, Result<(), TaskError>> {
        let task = self.task.clone();
        async move {
            let args = decode_args::<<T::Spec as TaskSpec>::Args>(&args)
                .and_then(|args| <T::Spec as TaskSpec>::check_args(&args).map(|()| args))
                .map_err(|err| TaskError::permanent(anyhow::anyhow!("invalid arguments: {err}")))?;
            task.run(args, ctx).await
        }
        .boxed()
    }
}

/// A registered task run with other options (see [`Registry::tune`]).
struct Tuned {
    inner: Arc<dyn ErasedTask>,
    descriptor: TaskDescriptor,
}

impl ErasedTask for Tuned {
    fn descriptor(&self) -> &TaskDescriptor {
        &self.descriptor
    }

    fn call(&self, args: Value, ctx: JobContext) -> BoxFuture<'static, Result<(), TaskError>> {
        self.inner.call(args, ctx)
    }
}

/// Task implementations by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: HashMap<&'static str, Arc<dyn ErasedTask>>,
}

impl Registry {
    /// Adds `task`; panics on a duplicate name (a programming error a test catches).
    pub fn register<T: Task>(&mut self, task: T) {
        let descriptor = TaskDescriptor::of::<T::Spec>();
        let name = descriptor.name;
        let erased = Arc::new(Erased {
            task: Arc::new(task),
            descriptor,
        });
        assert!(
            self.tasks.insert(name, erased).is_none(),
            "task {name} registered twice"
        );
    }

    /// Changes the options of the task named `name` in this registry only (the
    /// worker runs it with them; producers and the catalogue are unaffected).
    /// For tests and benchmarks that need, say, a short timeout or a small
    /// concurrency limit. Returns false when no such task is registered.
    ///
    /// # Panics
    /// If `tune` changes the queue: queues come from the catalogue, which
    /// producers also read, so a worker cannot move a task on its own.
    pub fn tune(&mut self, name: &str, tune: impl FnOnce(&mut TaskOptions)) -> bool {
        let Some((&key, inner)) = self.tasks.get_key_value(name) else {
            return false;
        };
        let mut descriptor = inner.descriptor().clone();
        tune(&mut descriptor.options);
        assert_eq!(
            descriptor.options.queue,
            inner.descriptor().options.queue,
            "Registry::tune cannot move {name} to another queue"
        );
        let tuned = Arc::new(Tuned {
            inner: inner.clone(),
            descriptor,
        });
        self.tasks.insert(key, tuned);
        true
    }

    /// The implementation named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn ErasedTask>> {
        self.tasks.get(name)
    }

    /// Every registered task.
    pub fn tasks(&self) -> impl Iterator<Item = &Arc<dyn ErasedTask>> {
        self.tasks.values()
    }
}

/// Every task this build runs. Keep in step with `conveyor_schema::catalogue()`.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register(diag::Noop);
    registry.register(diag::Sleep);
    registry.register(diag::Fail);
    registry.register(diag::Panic);
    registry.register(mail::PlanCampaign);
    registry.register(mail::SendChunk);
    registry.register(stats::RollupHourly);
    registry.register(stats::RollupDaily);
    registry.register(stats::Retention);
    registry.register(webhooks::ProfileSync);
    registry.register(webhooks::HeadshotSweep);
    registry
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn registry_matches_catalogue() {
        let registry = super::registry();
        let implemented: BTreeSet<_> = registry.tasks().map(|t| t.descriptor().name).collect();
        let declared: BTreeSet<_> = conveyor_schema::catalogue()
            .iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(implemented, declared);
    }

    #[test]
    fn tune_changes_one_task_only() {
        let mut registry = super::registry();
        assert!(registry.tune("diag.sleep", |o| o.concurrency = 2));
        assert!(!registry.tune("no.such.task", |o| o.concurrency = 2));
        let options = |name| registry.get(name).unwrap().descriptor().options.clone();
        assert_eq!(options("diag.sleep").concurrency, 2);
        assert_eq!(
            options("diag.noop"),
            conveyor_schema::TaskDescriptor::of::<conveyor_schema::args::diag::Noop>().options
        );
    }
}
