//! Rebuilds this crate when a migration is added, changed or removed.
//!
//! `embed_migrations!` reads `../migrations` at compile time, but cargo does not
//! know about that directory: a new migration left the old set embedded until
//! something else in this crate changed (seen as a test template database built
//! without the newest migration).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
