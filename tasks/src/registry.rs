//! The one list of task implementations, and the type erasure that lets the
//! worker call any of them by name.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use conveyor_schema::{TaskDescriptor, TaskSpec, catalogue::decode_args};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::{JobContext, TaskError, diag, mail, stats};

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
    /// Decodes `args` (a decode failure is permanent) and runs one attempt.
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
                .map_err(|err| TaskError::permanent(anyhow::anyhow!("invalid arguments: {err}")))?;
            task.run(args, ctx).await
        }
        .boxed()
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
}
