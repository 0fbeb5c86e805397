//! Conveyor's mail templates.
//!
//! `templates/mail/<name>/` holds `subject.txt`, `body.txt` and `body.html`
//! (minijinja; HTML is autoescaped; both bodies extend a shared layout,
//! `_layout.html` / `_layout.txt`). The folder is embedded in the binary at
//! build time, so no template is read from the working directory; a configured
//! directory, when set, is searched first and overrides embedded templates of
//! the same name. Undefined variables are errors, so a campaign whose
//! variables do not fit its template is refused when it is created.

use std::path::PathBuf;
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior, Value};

/// A rendered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    /// One line, whitespace trimmed.
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// The HTML body.
    pub html: String,
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    /// No template of that name.
    #[error("unknown mail template `{0}`")]
    Unknown(String),
    /// The template failed to render (syntax, undefined variable, …).
    #[error("template `{name}` failed to render: {detail}")]
    Render {
        /// The file that failed, e.g. `event_announcement/body.html`.
        name: String,
        /// minijinja's description, with the line.
        detail: String,
    },
}

/// The mail template set. Cheap to clone.
#[derive(Clone)]
pub struct MailTemplates {
    env: Arc<Environment<'static>>,
}

impl MailTemplates {
    /// The embedded templates, overridden by files under `override_dir` when given.
    pub fn new(override_dir: Option<PathBuf>) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        if let Some(dir) = override_dir {
            // The override loader only serves files that exist; the rest come from the embedded set.
            let mut embedded = Environment::new();
            minijinja_embed::load_templates!(&mut embedded);
            let embedded: std::collections::HashMap<String, String> = embedded
                .templates()
                .map(|(name, template)| (name.to_owned(), template.source().to_owned()))
                .collect();
            let from_disk = minijinja::path_loader(dir);
            env.set_loader(move |name| match from_disk(name)? {
                Some(source) => Ok(Some(source)),
                None => Ok(embedded.get(name).cloned()),
            });
        } else {
            minijinja_embed::load_templates!(&mut env);
        }
        Self { env: Arc::new(env) }
    }

    /// True when template `name` has all three parts.
    pub fn exists(&self, name: &str) -> bool {
        valid_name(name)
            && ["subject.txt", "body.txt", "body.html"]
                .iter()
                .all(|part| self.env.get_template(&format!("{name}/{part}")).is_ok())
    }

    /// Renders template `name` with `context` (a JSON object of variables).
    pub fn render(
        &self,
        name: &str,
        context: &serde_json::Value,
    ) -> Result<RenderedMail, TemplateError> {
        if !self.exists(name) {
            return Err(TemplateError::Unknown(name.to_owned()));
        }
        let context = Value::from_serialize(context);
        let part = |file: &str| {
            let full = format!("{name}/{file}");
            self.env
                .get_template(&full)
                .and_then(|template| template.render(&context))
                .map_err(|err| TemplateError::Render {
                    name: full,
                    detail: describe(&err),
                })
        };
        Ok(RenderedMail {
            subject: part("subject.txt")?
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            text: part("body.txt")?.trim().to_owned() + "\n",
            html: part("body.html")?,
        })
    }
}

/// Template names are folder names: no paths, no hidden or layout files.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(['_', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn describe(err: &minijinja::Error) -> String {
    let mut detail = err.to_string();
    if let Some(line) = err.line() {
        detail.push_str(&format!(" (line {line})"));
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context(name: &str) -> serde_json::Value {
        json!({
            "name": name,
            "event": {"title": "RustConf Berlin", "date": "12 March 2027, 9:00", "venue": "Kulturbrauerei", "url": "https://example.com/e/1"},
            "email": "ada@example.com",
            "unsubscribe_url": "https://example.com/u/abc",
        })
    }

    #[test]
    fn event_announcement_renders() {
        let mail = MailTemplates::new(None)
            .render("event_announcement", &context("Ada"))
            .unwrap();
        insta::assert_snapshot!("subject", mail.subject);
        insta::assert_snapshot!("text", mail.text);
        insta::assert_snapshot!("html", mail.html);
    }

    #[test]
    fn html_is_escaped_but_text_is_not() {
        let mail = MailTemplates::new(None)
            .render("event_announcement", &context("<script>alert(1)</script>"))
            .unwrap();
        assert!(!mail.html.contains("<script>"), "{}", mail.html);
        assert!(mail.html.contains("&lt;script&gt;"));
        assert!(mail.text.contains("<script>alert(1)</script>"));
    }

    #[test]
    fn missing_variable_names_the_problem() {
        let err = MailTemplates::new(None)
            .render(
                "event_announcement",
                &json!({"name": "Ada", "unsubscribe_url": "u"}),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("event_announcement/"), "{err}");
        assert!(err.contains("undefined"), "{err}");
    }

    #[test]
    fn unknown_and_layout_names_are_not_templates() {
        let templates = MailTemplates::new(None);
        assert!(!templates.exists("nope"));
        assert!(!templates.exists("_layout.html"));
        assert!(!templates.exists("../etc"));
    }

    #[test]
    fn a_directory_overrides_embedded_templates() {
        let dir = std::env::temp_dir().join(format!("conveyor-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("event_announcement")).unwrap();
        std::fs::write(
            dir.join("event_announcement/subject.txt"),
            "Custom for {{ name }}",
        )
        .unwrap();
        let mail = MailTemplates::new(Some(dir.clone()))
            .render("event_announcement", &context("Ada"))
            .unwrap();
        assert_eq!(mail.subject, "Custom for Ada");
        assert!(
            mail.html.contains("RustConf Berlin"),
            "the other parts still come from the embedded set"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
