//! rhai rules: user scripts in `rules/*.rhai` that transform readings,
//! publish messages and turn messages into device writes, in a sandbox.
//!
//! - `sandbox`: the engine, its limits and the functions scripts call;
//! - `load`: finding and compiling rule files (`file:line:col` errors);
//! - `runner`: [`Rules`], the calls into a compiled set;
//! - `convert`: rhai values <-> readings, values, JSON, payloads;
//! - `outcome`: what a call produced;
//! - `fixtures`: `edgebridge rules test`.

mod convert;
pub mod fixtures;
mod load;
mod outcome;
mod runner;
mod sandbox;
mod worker;

pub use load::{
    check_filter, filter_matches, FileStats, Handlers, RuleError, RuleErrors, RuleFile,
};
pub use outcome::{Failure, FailureKind, LineOutcome, Outcome, ReadingOutcome, Verdict, Write};
pub use runner::{Reloaded, RuleStats, Rules};
pub use sandbox::{
    AcceptWrites, DeviceWriter, MAX_ARRAY_SIZE, MAX_CALL_LEVELS, MAX_MAP_SIZE, MAX_OPERATIONS,
    MAX_PUBLISHES_PER_CALL, MAX_STATE_ITEMS, MAX_STRING_SIZE, MAX_WRITES_PER_CALL,
    RULES_STACK_SIZE,
};
pub use worker::{ReloadReport, RulesRuntime, RULES_QUEUE, SHED_RULES_AT};

#[cfg(test)]
mod tests;
