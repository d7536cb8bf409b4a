//! What a method declares next to its builder: name, summary, base use, model counts,
//! parameters (defaults and allowed ranges) and passes. The engine checks every tensor job
//! against its method's spec once, before building ([`MethodSpec::complete`]), so builders
//! receive every parameter present, in range, and rounded to f32 (METHODS.md §0); the Python
//! side reads the same specs through the binding for its config checks, `mergex methods`
//! and the planner.

use std::path::Path;

use super::merge::{TensorCtx, TensorMerge};
use crate::error::{Error, Result};
use crate::job::TensorJob;

/// Whether a method reads a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// The method has no base (a configured base is an ordinary input).
    None,
    /// A base model is required.
    Required,
    /// A base model is used when given.
    Optional,
}

impl BaseUse {
    /// The config-facing word: `none`, `required`, `optional`.
    pub fn word(self) -> &'static str {
        match self {
            BaseUse::None => "none",
            BaseUse::Required => "required",
            BaseUse::Optional => "optional",
        }
    }
}

/// What a parameter holds, for its checks and how it is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A real number.
    Number,
    /// A switch: 0 is false, anything else true (configs write `true`/`false`).
    Flag,
    /// A whole number (iteration counts).
    Count,
}

/// A parameter's value when the config does not set it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    /// The config must set it.
    Required,
    /// It may stay unset; the method then does without it.
    Optional,
    /// This value.
    Value(f64),
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// Name as written in configs.
    pub name: &'static str,
    /// One value per model (else one per tensor).
    pub per_model: bool,
    /// What it holds.
    pub kind: Kind,
    /// Its value when unset.
    pub default: Default,
    /// Smallest allowed value (inclusive), after rounding to f32.
    pub min: Option<f64>,
    /// Largest allowed value (inclusive), after rounding to f32.
    pub max: Option<f64>,
    /// One line for `mergex methods`.
    pub doc: &'static str,
}

impl ParamSpec {
    /// A real-number parameter without bounds.
    pub const fn number(name: &'static str, per_model: bool, default: Default, doc: &'static str) -> Self {
        ParamSpec { name, per_model, kind: Kind::Number, default, min: None, max: None, doc }
    }

    /// A switch with its default.
    pub const fn flag(name: &'static str, default: bool, doc: &'static str) -> Self {
        let value = if default { 1.0 } else { 0.0 };
        ParamSpec {
            name,
            per_model: false,
            kind: Kind::Flag,
            default: Default::Value(value),
            min: None,
            max: None,
            doc,
        }
    }

    /// The same parameter with values limited to `min..`.
    pub const fn at_least(mut self, min: f64) -> Self {
        self.min = Some(min);
        self
    }

    /// The same parameter with values limited to `min..=max`.
    pub const fn within(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }

    /// The same parameter counted in whole numbers.
    pub const fn count(mut self) -> Self {
        self.kind = Kind::Count;
        self
    }

    /// Round `v` to f32 (METHODS.md §0) and check it against the bounds.
    fn check(&self, v: f64) -> std::result::Result<f64, String> {
        let v = v as f32 as f64;
        if v.is_nan() {
            return Err("must be a number, got NaN".into());
        }
        match (self.min, self.max) {
            (Some(lo), Some(hi)) if !(lo..=hi).contains(&v) => {
                Err(format!("must be within [{lo}, {hi}], got {v}"))
            }
            (Some(lo), None) if v < lo => Err(format!("must be {lo} or more, got {v}")),
            _ => Ok(v),
        }
    }
}

/// How many statistics passes plus the output pass a method's tensors take, as the engine
/// plans them (data may add one where the note says so).
#[derive(Debug, Clone, Copy)]
pub struct Passes {
    /// Fewest passes (a tensor that fits in one chunk may take fewer).
    pub min: u8,
    /// Most passes.
    pub max: u8,
    /// When it takes more than `min`.
    pub note: &'static str,
}

impl Passes {
    /// Always `n` passes.
    pub const fn exactly(n: u8) -> Self {
        Passes { min: n, max: n, note: "" }
    }

    /// `min` to `max` passes, `note` saying when.
    pub const fn between(min: u8, max: u8, note: &'static str) -> Self {
        Passes { min, max, note }
    }
}

type Build<T> = fn(&TensorCtx<'_>) -> Result<Box<dyn TensorMerge<T>>>;

/// One registered method: its declaration and its builders.
#[derive(Debug)]
pub struct MethodSpec {
    /// Name as written in configs.
    pub name: &'static str,
    /// One line for `mergex methods`.
    pub summary: &'static str,
    /// Whether it needs a base.
    pub base: BaseUse,
    /// Fewest models besides the base, per tensor.
    pub min_models: usize,
    /// Most models besides the base, per tensor, if limited.
    pub max_models: Option<usize>,
    /// Its parameters.
    pub params: &'static [ParamSpec],
    /// Its passes over the inputs.
    pub passes: Passes,
    /// Build the f32 merger of one tensor.
    pub build_f32: Build<f32>,
    /// Build the f64 merger of one tensor (when an input is F64).
    pub build_f64: Build<f64>,
}

/// A method's spec with the builders of its generic `build` function.
macro_rules! spec {
    ($build:ident { $($field:ident : $value:expr),* $(,)? }) => {
        $crate::methods::spec::MethodSpec { $($field: $value,)* build_f32: $build::<f32>, build_f64: $build::<f64> }
    };
}
pub(crate) use spec;

fn number_word(n: usize) -> String {
    match n {
        1 => "one".into(),
        2 => "two".into(),
        3 => "three".into(),
        n => n.to_string(),
    }
}

impl MethodSpec {
    /// The models it takes, in words: "the base model and exactly one other model".
    pub fn models_words(&self) -> String {
        let (lo, hi, base) = (self.min_models, self.max_models, self.base);
        let plural = |n: usize| if n == 1 { "model" } else { "models" };
        match (base, hi) {
            (BaseUse::Required, Some(h)) if h == lo => {
                format!("the base model and exactly {} other {}", number_word(lo), plural(lo))
            }
            (BaseUse::Required, None) => {
                format!("a base model and at least {} other {}", number_word(lo), plural(lo))
            }
            (BaseUse::Optional, Some(h)) if h == lo => {
                format!("exactly {} {} besides the base", number_word(lo), plural(lo))
            }
            (BaseUse::None, Some(h)) if h == lo => {
                format!("exactly {} {} per tensor", number_word(lo), plural(lo))
            }
            (_, None) => format!("at least {} {}", number_word(lo), plural(lo)),
            (_, Some(h)) => format!("{lo} to {h} models"),
        }
    }

    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// `t` checked against this spec: the base and model count, every parameter known, set
    /// (defaults filled in), rounded to f32 and in range. Builders see only completed jobs.
    pub fn complete(&self, t: &TensorJob, paths: &[&Path]) -> Result<TensorJob> {
        let bad = |name: &str, model: Option<usize>, message: String| Error::InvalidParameter {
            name: name.into(),
            tensor: t.name.clone(),
            model: model.and_then(|m| paths.get(m)).map(|p| p.to_path_buf()),
            message,
        };
        match (self.base, t.base.is_some()) {
            (BaseUse::Required, false) => {
                return Err(Error::job("base_model", format!("{} needs a base model", self.name)))
            }
            (BaseUse::None, true) => {
                return Err(Error::job("base_model", format!("{} takes no base tensor", self.name)))
            }
            _ => {}
        }
        let n = t.inputs.len();
        if n < self.min_models || self.max_models.is_some_and(|h| n > h) {
            return Err(bad("models", None, format!("{} takes {}; got {n}", self.name, self.models_words())));
        }
        let mut out = t.clone();
        let known = |name: &String| self.param(name).is_some();
        if let Some(name) = t.params.keys().find(|k| !known(k)) {
            return Err(bad(name, None, format!("not a parameter of {}", self.name)));
        }
        for input in &t.inputs {
            if let Some(name) = input.params.keys().find(|k| !known(k)) {
                return Err(bad(name, Some(input.model), format!("not a parameter of {}", self.name)));
            }
        }
        for p in self.params {
            let fill = |values: &mut std::collections::BTreeMap<String, f64>, model: Option<usize>| {
                let value = match (values.get(p.name), p.default) {
                    (Some(&v), _) | (None, Default::Value(v)) => v,
                    (None, Default::Optional) => return Ok(()),
                    (None, Default::Required) => {
                        return Err(bad(p.name, model, "required but not set".into()))
                    }
                };
                let v = p.check(value).map_err(|m| bad(p.name, model, m))?;
                values.insert(p.name.into(), v);
                Ok(())
            };
            if p.per_model {
                for input in out.inputs.iter_mut() {
                    fill(&mut input.params, Some(input.model))?;
                }
            } else {
                fill(&mut out.params, None)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::InputRef;
    use crate::methods::{find, METHODS};

    fn job(inputs: usize, base: bool, params: &[(&str, f64)], per_model: &[(&str, f64)]) -> TensorJob {
        let input = |model| InputRef {
            model,
            tensor: "w".into(),
            position: model,
            params: per_model.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            scale: None,
            lora: None,
            rows: None,
        };
        TensorJob {
            name: "w".into(),
            dtype: "F32".into(),
            shape: vec![4],
            copy: false,
            base: base.then(|| InputRef {
                model: 9,
                tensor: "w".into(),
                position: 0,
                params: std::collections::BTreeMap::new(),
                scale: None,
                lora: None,
                rows: None,
            }),
            inputs: (0..inputs).map(input).collect(),
            params: params.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            encode: None,
        }
    }

    fn spec(name: &str) -> &'static MethodSpec {
        find(name).unwrap_or_else(|| unreachable!("{name} is registered"))
    }

    #[test]
    fn defaults_fill_in_as_the_config_would() {
        // A breadcrumbs job without gamma once ran with 0 while configs default to 0.01.
        let t = spec("breadcrumbs").complete(&job(2, true, &[], &[("weight", 1.0)]), &[]);
        let t = t.unwrap_or_else(|e| unreachable!("{e}"));
        for input in &t.inputs {
            assert_eq!(input.params.get("gamma"), Some(&(0.01f32 as f64)));
            assert_eq!(input.params.get("density"), Some(&1.0));
        }
        assert_eq!(t.params.get("lambda"), Some(&1.0));
        assert_eq!(t.params.get("normalize"), Some(&0.0));
        // Values reach the builders rounded to f32 (METHODS.md §0).
        let t = spec("linear").complete(&job(1, false, &[], &[("weight", 0.1)]), &[]);
        assert_eq!(t.ok().and_then(|t| t.inputs[0].params.get("weight").copied()), Some(0.1f32 as f64));
    }

    #[test]
    fn counts_ranges_and_names_are_checked() {
        let err = |r: Result<TensorJob>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = err(spec("slerp").complete(&job(2, true, &[("t", 0.5)], &[]), &[]));
        assert!(e.contains("slerp takes the base model and exactly one other model; got 2"), "{e}");
        let e = err(spec("sce").complete(&job(2, true, &[("select_topk", 1.5)], &[]), &[]));
        assert!(e.contains("select_topk") && e.contains("must be within [0, 1], got 1.5"), "{e}");
        let e = err(spec("ties").complete(&job(1, true, &[], &[("weight", 1.0), ("density", -0.5)]), &[]));
        assert!(e.contains("density") && e.contains("must be 0 or more"), "{e}");
        let e = err(spec("linear").complete(&job(1, false, &[("lambda", 1.0)], &[("weight", 1.0)]), &[]));
        assert!(e.contains("not a parameter of linear"), "{e}");
        let e = err(spec("nearswap").complete(&job(1, true, &[], &[]), &[]));
        assert!(e.contains("'t'") && e.contains("required but not set"), "{e}");
        let e = err(spec("ties").complete(&job(1, false, &[], &[("weight", 1.0)]), &[]));
        assert!(e.contains("ties needs a base model"), "{e}");
        let e = err(spec("karcher").complete(&job(2, true, &[], &[]), &[]));
        assert!(e.contains("karcher takes no base tensor"), "{e}");
    }

    #[test]
    fn registry_is_consistent() {
        let mut names: Vec<_> = METHODS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METHODS.len(), "a method is registered twice");
        for m in METHODS {
            assert!(m.passes.min >= 1 && m.passes.min <= m.passes.max, "{}", m.name);
            assert!(m.max_models.is_none_or(|h| h >= m.min_models) && m.min_models >= 1, "{}", m.name);
            for (i, p) in m.params.iter().enumerate() {
                assert!(m.params[..i].iter().all(|q| q.name != p.name), "{}: {} twice", m.name, p.name);
                if let Default::Value(v) = p.default {
                    assert!(p.check(v).is_ok(), "{}: default of {} out of range", m.name, p.name);
                }
            }
        }
    }
}
