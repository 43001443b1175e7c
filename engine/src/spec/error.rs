//! Located Pipefile errors: each one names the file, line and column of the offending value,
//! says what is wrong and what would be valid.

use std::sync::Arc;

use miette::{Diagnostic, NamedSource, SourceSpan};

/// One problem in a Pipefile, pointing at the value that causes it.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct SpecError {
    pub message: String,
    #[source_code]
    pub source_code: NamedSource<Arc<String>>,
    #[label("{label}")]
    pub span: SourceSpan,
    pub label: String,
    #[help]
    pub help: Option<String>,
    /// `file:line:col` of the span start, for editors and one-line output.
    pub location: String,
}

impl SpecError {
    /// An error at byte range `range` of the Pipefile `file` with text `text`.
    pub fn new(
        file: &str,
        text: &Arc<String>,
        range: (usize, usize),
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) -> SpecError {
        let (line, col) = super::locate::line_col(text, range.0);
        SpecError {
            message: message.into(),
            source_code: NamedSource::new(file, Arc::clone(text)),
            span: SourceSpan::new(range.0.into(), range.1.saturating_sub(range.0)),
            label: label.into(),
            help,
            location: format!("{file}:{line}:{col}"),
        }
    }
}

/// Every problem found in a Pipefile (validation collects them all rather than stopping at one).
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum LoadError {
    #[error("cannot read the Pipefile `{path}`: {source}")]
    #[diagnostic(
        code(pipe::pipefile),
        help("pass the pipeline file with `-f FILE` (or `--pipeline FILE`)")
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid Pipefile: {} error{}", errors.len(), if errors.len() == 1 { "" } else { "s" })]
    Invalid { errors: Vec<SpecError> },
}
