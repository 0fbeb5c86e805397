//! Fetching and storing profile headshots, defensively.
//!
//! The URL comes from a producer, so the fetch is fenced: the host must be on
//! the allow-list; every address it resolves to must be public unless internal
//! addresses are allowed (and the connection is pinned to the address checked,
//! so a second DNS answer cannot swap in an internal one); redirects are not
//! followed; the whole download has a deadline; the `Content-Type` must be an
//! accepted image type; and the body is cut off at the size cap (a declared
//! `Content-Length` over it is refused before reading). Images are stored
//! content-addressed by SHA-256, in the `headshots` table or as files.
//!
//! With files, a committed `headshots` row promises its file: `<dir>/<sha256>`
//! exists for as long as the row does, so a profile that points at a row (see
//! `profile_sync`) never points at a missing file. Whoever writes or removes a
//! file holds a transaction-scoped advisory lock on its checksum
//! (`lock_file`): [`store`] (shared) makes sure of the file and inserts the
//! row in one transaction; [`remove_unreferenced`] (exclusive) removes the file
//! only if, under the lock, no row names it. So an import storing an image
//! again while a DELETE removes its file either finds the file gone and writes
//! it anew, or commits its row first and the removal keeps the file.
//!
//! An image goes when its last reference does (`profile_sync`): the DELETE
//! that clears it, the import that replaces it, or the import that downloaded
//! it and did not use it removes the row if no profile names it, and commits
//! before it removes the file, never the file under the row's lock before
//! committing: if that commit failed or the process died in between, the row
//! would still be there, still named by the profile and reusable by any
//! import, with its file gone. In the order used, a crash between the commit
//! and the removal leaves at worst a file no row names; it is complete (written under a temporary name and synced, then
//! renamed, and the directory synced, all before the row commits) and is
//! reused by the next import of the same image, or removed by the sweep
//! (`headshot_sweep`) once it is old enough.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_schema::db::headshots;
use conveyor_schema::pool::PgPool;
use diesel::prelude::*;
use sha2::{Digest, Sha256};

/// How headshots are fetched and where they go (from `[webhooks.headshots]`).
#[derive(Debug, Clone, Default)]
pub struct HeadshotPolicy {
    /// Exact hosts, or `*.domain` for its subdomains. Empty refuses everything.
    pub allowed_hosts: Vec<String>,
    /// Permits loopback, private and other non-public addresses.
    pub allow_internal_addresses: bool,
    /// Size cap in bytes.
    pub max_bytes: u64,
    /// Deadline for one download.
    pub timeout: Duration,
    /// Accepted content types (lowercase, without parameters).
    pub content_types: Vec<String>,
    /// Store files here; `None` stores in the database.
    pub dir: Option<PathBuf>,
}

/// A downloaded image.
#[derive(Debug, Clone)]
pub struct Image {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The response's content type, without parameters.
    pub content_type: String,
    /// Lowercase hex SHA-256 of `bytes`.
    pub sha256: String,
}

/// Why a download did not produce an image.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Refused by policy or by what the server sent; retrying cannot help.
    #[error("{0}")]
    Permanent(String),
    /// A timeout, connection failure, 429 or 5xx; worth retrying.
    #[error("{0}")]
    Transient(String),
}

fn permanent(message: impl Into<String>) -> DownloadError {
    DownloadError::Permanent(message.into())
}

/// Whether `host` is allowed by `allowed` (exact, or `*.domain` for a strict subdomain).
pub fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    allowed.iter().any(|rule| match rule.strip_prefix("*.") {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => *rule == host,
    })
}

/// True for addresses on the public internet. False for loopback, private,
/// shared (CGNAT), link-local, site-local, unique-local, documentation,
/// benchmarking, IETF protocol assignments, discard-only, SRv6, multicast,
/// broadcast, reserved and unspecified ranges, and for the deprecated
/// IPv4-compatible (`::a.b.c.d`) and SIIT (`::ffff:0:a.b.c.d`) forms. An
/// address that carries an IPv4 address (`::ffff:a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`) is as public as that address,
/// so an internal target cannot hide inside an IPv6 form.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments, 192.0.0.0/24
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast, deprecated
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// `ip` as 128 bits, for prefix tests.
fn bits(ip: Ipv6Addr) -> u128 {
    u128::from_be_bytes(ip.octets())
}

/// Whether `ip` is in `net`/`len` (`len` from 1 to 128).
fn in_net(ip: u128, net: u128, len: u32) -> bool {
    (ip ^ net) >> (128 - len) == 0
}

const V4_MAPPED: u128 = 0xffff_0000_0000; // ::ffff:0:0/96
const NAT64: u128 = 0x0064_ff9b << 96; // 64:ff9b::/96
const SIX_TO_FOUR: u128 = 0x2002 << 112; // 2002::/16

/// The IPv4 address inside an IPv4-mapped, NAT64 (well-known prefix) or 6to4 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let ip = bits(ip);
    let low = |shift: u32| Ipv4Addr::from(((ip >> shift) & 0xffff_ffff) as u32);
    if in_net(ip, V4_MAPPED, 96) || in_net(ip, NAT64, 96) {
        return Some(low(0));
    }
    if in_net(ip, SIX_TO_FOUR, 16) {
        return Some(low(80));
    }
    None
}

/// IPv6 ranges that are never a public image host, as (prefix, length, what).
const NOT_PUBLIC_V6: &[(u128, u32, &str)] = &[
    (0, 96, "IPv4-compatible (deprecated), loopback, unspecified"),
    (0xffff_0000_0000_0000, 96, "SIIT IPv4-translated"),
    (0x0064_ff9b_0001 << 80, 48, "local-use NAT64"),
    (0x0100 << 112, 64, "discard-only"),
    (
        0x2001 << 112,
        23,
        "IETF protocol assignments (Teredo, ORCHID, benchmarking)",
    ),
    (0x2001_0db8 << 96, 32, "documentation"),
    (0x3fff << 112, 20, "documentation"),
    (0x5f00 << 112, 16, "SRv6 SIDs"),
    (0xfc00 << 112, 7, "unique local"),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local (deprecated)"),
    (0xff00 << 112, 8, "multicast"),
];

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let ip = bits(ip);
    !NOT_PUBLIC_V6
        .iter()
        .any(|(net, len, _)| in_net(ip, *net, *len))
}

/// Downloads `url` under `policy`.
pub async fn download(policy: &HeadshotPolicy, url: &str) -> Result<Image, DownloadError> {
    let parsed = url::Url::parse(url).map_err(|e| permanent(format!("invalid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(permanent("only http and https URLs are fetched"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| permanent("the URL has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if !host_allowed(&policy.allowed_hosts, &host) {
        return Err(permanent(format!(
            "host `{host}` is not in webhooks.headshots.allowed_hosts"
        )));
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| DownloadError::Transient(format!("cannot resolve `{host}`: {e}")))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(DownloadError::Transient(format!(
            "`{host}` resolved to no address"
        )));
    };
    if !policy.allow_internal_addresses
        && let Some(internal) = addrs.iter().find(|a| !is_public(a.ip()))
    {
        return Err(permanent(format!(
            "`{host}` resolves to the internal address {}, and internal addresses are not allowed",
            internal.ip()
        )));
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(policy.timeout)
        .no_proxy()
        .resolve(&host, first)
        .build()
        .map_err(|e| DownloadError::Transient(format!("HTTP client: {e}")))?;
    let transient = |e: reqwest::Error| {
        if e.is_timeout() {
            DownloadError::Transient(format!(
                "downloading {url}: timed out after {:?}",
                policy.timeout
            ))
        } else {
            DownloadError::Transient(format!("downloading {url}: {e}"))
        }
    };
    let mut response = client.get(parsed).send().await.map_err(transient)?;
    let status = response.status();
    if status.as_u16() == 404 || status.as_u16() == 410 {
        return Err(permanent(format!("{url} answered {status}: no such image")));
    }
    if status.as_u16() == 429 || status.is_server_error() {
        return Err(DownloadError::Transient(format!("{url} answered {status}")));
    }
    if !status.is_success() {
        return Err(permanent(format!(
            "{url} answered {status} (redirects are not followed)"
        )));
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if !policy.content_types.contains(&content_type) {
        return Err(permanent(format!(
            "content type `{content_type}` is not an accepted image type"
        )));
    }
    let too_large = || permanent(format!("the image exceeds {} bytes", policy.max_bytes));
    if response
        .content_length()
        .is_some_and(|n| n > policy.max_bytes)
    {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transient)? {
        if (bytes.len() + chunk.len()) as u64 > policy.max_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(Image {
        bytes,
        content_type,
        sha256,
    })
}

/// First key of the advisory lock on a headshot file; the second is
/// `hashtext(sha256)`. Two-key locks never collide with single-key ones (the
/// migrations' lock); every instance must use the same value.
const FILE_LOCK_CLASS: i32 = 0x4853_4854;

/// Takes the lock on the file of `sha256` until the transaction ends: shared
/// to make sure the file exists, exclusive to remove it.
fn lock_file(conn: &mut PgConnection, sha256: &str, exclusive: bool) -> QueryResult<()> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1, hashtext($2))"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1, hashtext($2))"
    };
    diesel::sql_query(sql)
        .bind::<diesel::sql_types::Integer, _>(FILE_LOCK_CLASS)
        .bind::<diesel::sql_types::Text, _>(sha256)
        .execute(conn)?;
    Ok(())
}

/// Stores `image` once: a `headshots` row holding the bytes, or naming a file
/// that is made sure of, under the file's lock, in the row's transaction.
pub async fn store(db: &PgPool, policy: &HeadshotPolicy, image: Image) -> anyhow::Result<()> {
    let dir = policy.dir.clone();
    conveyor_schema::pool::run(db, move |conn| {
        Ok(conn.transaction::<_, anyhow::Error, _>(|conn| {
            let data = match &dir {
                Some(dir) => {
                    lock_file(conn, &image.sha256, false)?;
                    write_file(dir, &image)?;
                    None
                }
                None => Some(image.bytes.as_slice()),
            };
            diesel::insert_into(headshots::table)
                .values((
                    headshots::sha256.eq(&image.sha256),
                    headshots::content_type.eq(&image.content_type),
                    headshots::size_bytes.eq(i32::try_from(image.bytes.len()).unwrap_or(i32::MAX)),
                    headshots::data.eq(data),
                ))
                .on_conflict_do_nothing()
                .execute(conn)?;
            Ok(())
        }))
    })
    .await?
}

/// Writes `<dir>/<sha256>` unless it exists holding exactly `image`'s bytes,
/// to a temporary name and then renamed, so the name never holds part of an
/// image; durably, so the row that names the file commits only once the file
/// would survive a power loss.
///
/// A file found under the name is read and compared first: one an older
/// release left cut short (it renamed before syncing, so a power loss could
/// leave the name with part of the bytes), or one damaged on disk since, is
/// replaced by a whole copy rather than reused. Images are capped in size, so
/// the read costs little beside the download that brought them.
///
/// The temporary file is synced before the rename (otherwise the name could
/// reach the disk before the bytes, and a power loss leave it empty or cut
/// short), and the directory after it, so the name itself is on disk. A file
/// found already there is the same bytes renamed in by another `store`, which
/// may not have synced the directory yet: it is synced here too. A temporary
/// file left by a failure is removed; one left by a crash, by the sweep
/// (`headshot_sweep`). Runs on the blocking pool (inside `pool::run`).
fn write_file(dir: &Path, image: &Image) -> std::io::Result<()> {
    let path = dir.join(&image.sha256);
    let found = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    if found.as_deref() != Some(image.bytes.as_slice()) {
        if let Some(bytes) = &found {
            tracing::warn!(
                sha256 = %image.sha256,
                found_bytes = bytes.len(),
                image_bytes = image.bytes.len(),
                "a headshot file did not hold its image's bytes; writing it again"
            );
        }
        if !dir.try_exists()? {
            std::fs::create_dir_all(dir)?;
            match dir.parent() {
                Some(parent) if parent.as_os_str().is_empty() => sync_dir(Path::new("."))?,
                Some(parent) => sync_dir(parent)?,
                None => {}
            }
        }
        let partial = dir.join(format!(
            "{TEMP_PREFIX}{}.{}",
            image.sha256,
            uuid::Uuid::new_v4().simple()
        ));
        let written =
            write_synced(&partial, &image.bytes).and_then(|()| std::fs::rename(&partial, &path));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(err);
        }
    }
    sync_dir(dir)
}

/// The start of a temporary file's name: `.<sha256>.<uuid>`.
pub(crate) const TEMP_PREFIX: &str = ".";

/// Creates `path` with `bytes` and waits until they are on disk.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Waits until the entries of `dir` (names created, renamed or removed) are on disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `<dir>/<sha256>` unless a `headshots` row names it; called once the
/// transaction that deleted the row has committed, when an import may have
/// stored the image again since. Returns whether a file was removed (one
/// already gone is no failure); fails if the database or the removal does.
pub async fn remove_unreferenced(db: &PgPool, dir: &Path, sha256: String) -> anyhow::Result<bool> {
    let path = dir.join(&sha256);
    conveyor_schema::pool::run(db, move |conn| {
        Ok(conn.transaction::<_, anyhow::Error, _>(|conn| {
            lock_file(conn, &sha256, true)?;
            // A statement after the lock: it sees every row a `store` committed before letting go.
            let named = headshots::table
                .find(&sha256)
                .select(headshots::sha256)
                .first::<String>(conn)
                .optional()?;
            if named.is_some() {
                return Ok(false);
            }
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(err) => Err(err.into()),
            }
        }))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_exact_hosts_and_subdomains() {
        let allowed = vec!["img.example.com".to_owned(), "*.cdn.example.org".to_owned()];
        assert!(host_allowed(&allowed, "img.example.com"));
        assert!(host_allowed(&allowed, "IMG.example.com."));
        assert!(host_allowed(&allowed, "a.cdn.example.org"));
        assert!(!host_allowed(&allowed, "cdn.example.org"));
        assert!(!host_allowed(&allowed, "evilimg.example.com"));
        assert!(!host_allowed(&allowed, "img.example.com.evil.net"));
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.8",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "feff::1",
            "ff02::1",
            "100::1",
            "2001::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "64:ff9b:1::1",
            "::ffff:0:808:808",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:2800:220:1::1",
            "2a00:1450::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_judged_by_the_ipv4_address() {
        // IPv4-compatible `::a.b.c.d` is deprecated: refused even for a public address.
        for ip in ["::127.0.0.1", "::10.0.0.1", "::8.8.8.8"] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        let internal = [
            "::ffff:127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::169.254.169.254",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2002:c0a8:101:1::1",
        ];
        for ip in internal {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        let public = ["::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
