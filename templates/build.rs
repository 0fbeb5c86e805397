//! Embeds `templates/mail/` into the binary (see `minijinja_embed`).
fn main() {
    minijinja_embed::embed_templates!("mail");
}
