//! A Python tokenizer, just enough for the static scan: names, operators, string literals (with
//! their value), numbers and logical line ends, each with its 1-based line and column (in
//! characters). Comments and the text inside strings never become names, so a word in a string or
//! a comment is never mistaken for an import; the code inside f-string replacement fields *is*
//! tokenized (an `f"{__import__('socket')}"` is code).
//!
//! It never fails: malformed source yields some tokens, not an error (Python itself reports it).

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Name,
    /// One operator or delimiter character (`.`, `(`, `,`, ...).
    Op,
    /// A string literal; [`Token::value`] holds its value unless it is an f-string or bytes.
    Str,
    Number,
    /// The end of a logical line (outside brackets).
    Newline,
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// The name, the operator, or the literal's source text.
    pub text: String,
    /// A plain string literal's value.
    pub value: Option<String>,
    pub line: usize,
    pub col: usize,
}

/// Tokenizes Python source.
pub fn tokenize(source: &str) -> Vec<Token> {
    let normalized = source.replace("\r\n", "\n").replace('\r', "\n");
    let mut lexer = Lexer {
        chars: normalized.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
        depth: 0,
        in_fstring: 0,
        out: Vec::new(),
    };
    lexer.code(None);
    lexer.out
}

struct Lexer {
    chars: Vec<char>,
    i: usize,
    line: usize,
    col: usize,
    /// Open brackets.
    depth: usize,
    /// Nesting of f-string replacement fields being tokenized.
    in_fstring: usize,
    out: Vec<Token>,
}

const STRING_PREFIXES: &[&str] = &["r", "u", "b", "f", "t", "br", "rb", "fr", "rf", "tr", "rt"];

impl Lexer {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.i + ahead).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn push(&mut self, kind: Kind, text: String, value: Option<String>, line: usize, col: usize) {
        self.out.push(Token {
            kind,
            text,
            value,
            line,
            col,
        });
    }

    /// Tokenizes code until the end, or (inside an f-string replacement field opened at bracket
    /// depth `field`) until its `}`, `!` conversion or `:` format spec, which it leaves unread.
    fn code(&mut self, field: Option<usize>) {
        while let Some(c) = self.peek(0) {
            let (line, col) = (self.line, self.col);
            match c {
                '#' => {
                    while self.peek(0).is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                '\\' if self.peek(1) == Some('\n') => {
                    self.bump();
                    self.bump();
                }
                '\n' => {
                    self.bump();
                    if self.depth == 0 && self.in_fstring == 0 {
                        self.push(Kind::Newline, "\n".into(), None, line, col);
                    }
                }
                c if c.is_whitespace() => {
                    self.bump();
                }
                '"' | '\'' => self.string("", line, col),
                c if c.is_alphabetic() || c == '_' => {
                    let mut name = String::new();
                    while let Some(c) = self.peek(0).filter(|c| c.is_alphanumeric() || *c == '_') {
                        name.push(c);
                        self.bump();
                    }
                    let is_prefix = STRING_PREFIXES.contains(&name.to_ascii_lowercase().as_str());
                    if is_prefix && matches!(self.peek(0), Some('"' | '\'')) {
                        self.string(&name, line, col);
                    } else {
                        self.push(Kind::Name, name, None, line, col);
                    }
                }
                c if c.is_ascii_digit()
                    || (c == '.' && self.peek(1).is_some_and(|d| d.is_ascii_digit())) =>
                {
                    let mut text = String::new();
                    while let Some(c) = self.peek(0) {
                        let exponent_sign = matches!(c, '+' | '-')
                            && text.ends_with(['e', 'E'])
                            && !text.starts_with("0x")
                            && !text.starts_with("0X");
                        if !(c.is_alphanumeric() || c == '_' || c == '.' || exponent_sign) {
                            break;
                        }
                        text.push(c);
                        self.bump();
                    }
                    self.push(Kind::Number, text, None, line, col);
                }
                '}' if field == Some(self.depth) => return,
                ':' if field == Some(self.depth) => return,
                '!' if field == Some(self.depth) && self.peek(1) != Some('=') => return,
                '(' | '[' | '{' => {
                    self.bump();
                    self.depth += 1;
                    self.push(Kind::Op, c.to_string(), None, line, col);
                }
                ')' | ']' | '}' => {
                    self.bump();
                    self.depth = self.depth.saturating_sub(1);
                    self.push(Kind::Op, c.to_string(), None, line, col);
                }
                _ => {
                    self.bump();
                    self.push(Kind::Op, c.to_string(), None, line, col);
                }
            }
        }
    }

    /// A string literal whose prefix (already read) is `prefix`; the quote is next.
    fn string(&mut self, prefix: &str, line: usize, col: usize) {
        let prefix = prefix.to_ascii_lowercase();
        let raw = prefix.contains('r');
        let formatted = prefix.contains('f') || prefix.contains('t');
        let bytes = prefix.contains('b');
        let quote = self.bump().expect("a quote is next");
        let triple = self.peek(0) == Some(quote) && self.peek(1) == Some(quote);
        if triple {
            self.bump();
            self.bump();
        }
        let mut body = String::new();
        let mut text = format!("{prefix}{quote}");
        while let Some(c) = self.peek(0) {
            if c == '\n' && !triple {
                break; // unterminated: Python reports it
            }
            if c == '\\' {
                self.bump();
                body.push('\\');
                if let Some(next) = self.bump() {
                    body.push(next);
                }
                continue;
            }
            if c == quote {
                if !triple {
                    self.bump();
                    break;
                }
                if self.peek(1) == Some(quote) && self.peek(2) == Some(quote) {
                    self.bump();
                    self.bump();
                    self.bump();
                    break;
                }
            }
            if formatted && c == '{' {
                if self.peek(1) == Some('{') {
                    self.bump();
                    self.bump();
                    body.push('{');
                } else {
                    self.bump();
                    self.replacement_field();
                }
                continue;
            }
            self.bump();
            body.push(c);
        }
        text.push_str(&body);
        let value = (!formatted && !bytes).then(|| if raw { body } else { unescape(&body) });
        self.push(Kind::Str, text, value, line, col);
    }

    /// The inside of an f-string's `{...}` (the `{` is read): code, then an optional `!x`
    /// conversion and `:spec` (which may hold nested fields), then `}`.
    fn replacement_field(&mut self) {
        self.in_fstring += 1;
        let field = self.depth;
        self.code(Some(field));
        self.depth = field;
        if self.peek(0) == Some('!') {
            self.bump();
            while self.peek(0).is_some_and(|c| c.is_alphanumeric()) {
                self.bump();
            }
        }
        if self.peek(0) == Some(':') {
            self.bump();
            while let Some(c) = self.peek(0) {
                match c {
                    '}' => break,
                    '{' => {
                        self.bump();
                        self.replacement_field();
                    }
                    '"' | '\'' | '\n' => break, // the string ends (malformed spec)
                    _ => {
                        self.bump();
                    }
                }
            }
        }
        if self.peek(0) == Some('}') {
            self.bump();
        }
        self.in_fstring -= 1;
    }
}

/// The value of a non-raw string body: the usual escapes.
fn unescape(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            out.push('\\');
            break;
        };
        let hex = |n: usize, chars: &mut std::iter::Peekable<std::str::Chars>| {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .and_then(char::from_u32)
        };
        match e {
            '\n' => {}
            '\\' | '\'' | '"' => out.push(e),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            '0' => out.push('\0'),
            'x' => out.extend(hex(2, &mut chars)),
            'u' => out.extend(hex(4, &mut chars)),
            'U' => out.extend(hex(8, &mut chars)),
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Vec<(String, usize, usize)> {
        tokenize(src)
            .into_iter()
            .filter(|t| t.kind == Kind::Name)
            .map(|t| (t.text, t.line, t.col))
            .collect()
    }

    #[test]
    fn words_in_strings_and_comments_are_not_names() {
        let src = "x = 'import socket'  # import socket\ny = \"\"\"\nimport ssl\n\"\"\"\nz = r'\\' import'\n";
        let found: Vec<String> = names(src).into_iter().map(|n| n.0).collect();
        assert_eq!(found, ["x", "y", "z"]);
    }

    #[test]
    fn positions_are_one_based_characters() {
        let src = "é = 1\n  import socket\n";
        assert_eq!(
            names(src),
            [
                ("é".to_string(), 1, 1),
                ("import".to_string(), 2, 3),
                ("socket".to_string(), 2, 10)
            ]
        );
    }

    #[test]
    fn string_values_are_decoded_and_prefixes_understood() {
        let tokens = tokenize("a('soc\\x6bet', b'x', rb'y', u\"z\", f'{w}')");
        let strs: Vec<Option<String>> = tokens
            .iter()
            .filter(|t| t.kind == Kind::Str)
            .map(|t| t.value.clone())
            .collect();
        assert_eq!(
            strs,
            [Some("socket".into()), None, None, Some("z".into()), None]
        );
        assert!(tokens.iter().any(|t| t.kind == Kind::Name && t.text == "w"));
    }

    #[test]
    fn f_string_fields_are_code_and_nested_quotes_work() {
        let src = "s = f\"{__import__('socket')!r:>{width}} {{not_code}}\"\nt = 1\n";
        let found: Vec<String> = names(src).into_iter().map(|n| n.0).collect();
        assert_eq!(found, ["s", "__import__", "width", "t"]);
        let tokens = tokenize(src);
        let value = tokens
            .iter()
            .find(|t| t.kind == Kind::Str && t.value.is_some())
            .and_then(|t| t.value.clone());
        assert_eq!(value.as_deref(), Some("socket"));
    }

    #[test]
    fn newlines_end_logical_lines_only_outside_brackets() {
        let tokens = tokenize("a = (1,\n 2)\nb = 3 \\\n + 4\n");
        let newlines = tokens.iter().filter(|t| t.kind == Kind::Newline).count();
        assert_eq!(newlines, 2);
    }

    #[test]
    fn malformed_source_does_not_panic() {
        for src in [
            "'unterminated",
            "f'{",
            "f'{x:",
            "\"\"\"open",
            "(((",
            "f'{a!'",
            "\\",
        ] {
            let _ = tokenize(src);
        }
    }
}
