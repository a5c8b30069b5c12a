//! GBNF (llama.cpp's grammar format) to llguidance's Lark dialect (placeholder).

/// A GBNF grammar that cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GbnfError {
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column of the problem.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for GbnfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for GbnfError {}

/// Translates a llama.cpp GBNF grammar into llguidance's Lark dialect.
pub fn gbnf_to_lark(_gbnf: &str) -> Result<String, GbnfError> {
    Err(GbnfError {
        line: 1,
        column: 1,
        message: "GBNF is not supported yet".into(),
    })
}
