-- A headshot image goes once no profile names it: a DELETE, an import that
-- replaces the image, and an import whose download went unused each count the
-- profiles naming the image (`profile_sync::release`), under the image row's
-- lock. Without an index that count read the whole `profiles` table each
-- time. Partial: most profiles have no headshot.
--
-- Built CONCURRENTLY (outside a transaction, see metadata.toml), so webhooks
-- go on updating profiles while it is built. Should the build fail, it leaves
-- an INVALID index of this name, which the next `conveyor migrate run` drops
-- before building it again.
CREATE INDEX CONCURRENTLY profiles_headshot_sha256 ON profiles (headshot_sha256)
    WHERE headshot_sha256 IS NOT NULL;
