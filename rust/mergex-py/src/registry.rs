//! The method registry of mergex-core as Python objects: everything the Python side knows of
//! a method (config checks, `mergex methods`, the planner) comes from here.

use mergex_core::methods::spec::{Default, Kind, MethodSpec, ParamSpec};
use mergex_core::methods::METHODS;
use pyo3::prelude::*;

/// One parameter of a method.
#[pyclass(frozen, get_all, module = "mergex._mergex")]
#[derive(Clone)]
pub struct MethodParam {
    name: String,
    per_model: bool,
    /// `number`, `flag` or `count`.
    kind: &'static str,
    /// The config must set it.
    required: bool,
    /// Its value when unset (`None` when required or optional).
    default: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    doc: String,
}

/// One registered method.
#[pyclass(frozen, get_all, module = "mergex._mergex")]
#[derive(Clone)]
pub struct Method {
    name: String,
    summary: String,
    /// `none`, `required` or `optional`.
    base: &'static str,
    min_models: usize,
    max_models: Option<usize>,
    /// The model count in words, for errors ("the base model and exactly one other model").
    models_words: String,
    params: Vec<MethodParam>,
    passes_min: u8,
    passes_max: u8,
    /// When it takes more passes than `passes_min`.
    passes_note: String,
}

fn param(p: &ParamSpec) -> MethodParam {
    MethodParam {
        name: p.name.into(),
        per_model: p.per_model,
        kind: match p.kind {
            Kind::Number => "number",
            Kind::Flag => "flag",
            Kind::Count => "count",
        },
        required: p.default == Default::Required,
        default: match p.default {
            Default::Value(v) => Some(v),
            Default::Required | Default::Optional => None,
        },
        min: p.min,
        max: p.max,
        doc: p.doc.into(),
    }
}

fn method(m: &MethodSpec) -> Method {
    Method {
        name: m.name.into(),
        summary: m.summary.into(),
        base: m.base.word(),
        min_models: m.min_models,
        max_models: m.max_models,
        models_words: m.models_words(),
        params: m.params.iter().map(param).collect(),
        passes_min: m.passes.min,
        passes_max: m.passes.max,
        passes_note: m.passes.note.into(),
    }
}

/// Every method the engine runs, in registry order.
#[pyfunction]
pub fn methods() -> Vec<Method> {
    METHODS.iter().map(|m| method(m)).collect()
}
