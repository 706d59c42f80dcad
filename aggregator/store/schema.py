"""The fleet database's schema, as numbered migrations applied in order at start.

Append a migration; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils


def _m001_foundation(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            site TEXT NOT NULL DEFAULT '',
            country TEXT NOT NULL DEFAULT '',
            provider TEXT NOT NULL DEFAULT '',
            profile TEXT NOT NULL DEFAULT '',
            enrolled_at REAL,
            reported_status TEXT NOT NULL DEFAULT 'unknown',
            status_changed_at REAL,
            last_seen REAL,
            interval_s REAL NOT NULL DEFAULT 10,
            inventory TEXT,
            malformed_messages INTEGER NOT NULL DEFAULT 0,
            telemetry_last_seq INTEGER NOT NULL DEFAULT 0,
            events_last_seq INTEGER NOT NULL DEFAULT 0
        );
        -- A rowid table: payloads are ~1 KB, and SQLite stores large rows of a WITHOUT ROWID
        -- table inside its B-tree (inserts measured 4x slower).
        CREATE TABLE telemetry (
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            received_at REAL NOT NULL,
            payload BLOB NOT NULL,
            UNIQUE (node_id, seq)
        );
        CREATE INDEX telemetry_received ON telemetry (received_at);
        CREATE TABLE telemetry_rollup (
            node_id TEXT NOT NULL,
            bucket_start REAL NOT NULL,
            metric TEXT NOT NULL,
            count INTEGER NOT NULL,
            min REAL NOT NULL,
            max REAL NOT NULL,
            sum REAL NOT NULL,
            PRIMARY KEY (node_id, metric, bucket_start)
        ) WITHOUT ROWID;
        CREATE TABLE gaps (
            id INTEGER PRIMARY KEY,
            node_id TEXT NOT NULL,
            channel TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            detected_at REAL NOT NULL,
            reason TEXT NOT NULL
        );
        CREATE INDEX gaps_node ON gaps (node_id, channel, first_seq);
        CREATE TABLE events (
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            received_at REAL NOT NULL,
            type TEXT NOT NULL,
            vm_uuid TEXT NOT NULL DEFAULT '',
            vm_name TEXT NOT NULL DEFAULT '',
            summary TEXT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (node_id, seq)
        ) WITHOUT ROWID;
        CREATE TABLE enrollment_tokens (
            id INTEGER PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            site TEXT NOT NULL,
            country TEXT NOT NULL,
            provider TEXT NOT NULL,
            profile TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            used_by TEXT
        );
        CREATE TABLE api_tokens (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            issued_at REAL NOT NULL,
            not_after REAL NOT NULL,
            revoked_at REAL
        );
        """
    )


def _m002_trust(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        ALTER TABLE nodes ADD COLUMN revoked_at REAL;
        ALTER TABLE nodes ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT '';
        -- A token bound to a node id may re-enroll that (existing) node; others make new ones.
        ALTER TABLE enrollment_tokens ADD COLUMN node_id TEXT;
        ALTER TABLE enrollment_tokens ADD COLUMN withdrawn_at REAL;
        ALTER TABLE enrollment_tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
        ALTER TABLE certificates ADD COLUMN kind TEXT NOT NULL DEFAULT 'enroll';
        ALTER TABLE certificates ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
        ALTER TABLE certificates ADD COLUMN pem TEXT NOT NULL DEFAULT '';
        CREATE INDEX certificates_node ON certificates (node_id, issued_at);
        CREATE INDEX certificates_key ON certificates (key_id);
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL DEFAULT 'ok',
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_ts ON audit (ts);
        CREATE INDEX audit_subject ON audit (subject, ts);
        """
    )


def _m003_vms(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN orders_last_seq INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN facts TEXT;  -- HostFacts from enrollment (disk, NICs ...)
        CREATE INDEX nodes_place ON nodes (country, provider);
        CREATE TABLE images (
            name TEXT PRIMARY KEY,
            format TEXT NOT NULL,          -- raw, qcow2, kernel, initrd
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,            -- the file on the aggregator
            created_at REAL NOT NULL
        );
        CREATE TABLE vms (
            id TEXT PRIMARY KEY,           -- the libvirt domain UUID
            name TEXT NOT NULL,
            node_id TEXT,                  -- where it is placed (NULL: nowhere yet)
            vcpus INTEGER NOT NULL,
            memory_mib INTEGER NOT NULL,
            disk_gib INTEGER NOT NULL,
            spec TEXT NOT NULL,            -- the API request, JSON
            anti_affinity TEXT,
            desired_state TEXT NOT NULL,   -- running, stopped, deleted
            actual_state TEXT NOT NULL DEFAULT 'pending',
            state_reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            deleted_at REAL
        );
        CREATE UNIQUE INDEX vms_name ON vms (name) WHERE deleted_at IS NULL;
        CREATE INDEX vms_node ON vms (node_id) WHERE deleted_at IS NULL;
        CREATE TABLE orders (
            id TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            vm_id TEXT,
            action TEXT NOT NULL,
            payload BLOB NOT NULL,         -- the signed envelope, exactly as published
            state TEXT NOT NULL,           -- pending, sent, accepted, succeeded, failed, expired
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            result TEXT NOT NULL DEFAULT '{}',
            error TEXT NOT NULL DEFAULT '',
            UNIQUE (node_id, seq)
        );
        CREATE INDEX orders_open ON orders (state, next_attempt_at)
            WHERE state IN ('pending', 'sent', 'accepted');
        CREATE INDEX orders_vm ON orders (vm_id, created_at);
        CREATE TABLE order_history (
            order_id TEXT NOT NULL,
            ts REAL NOT NULL,
            state TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX order_history_order ON order_history (order_id, ts);
        -- Append-only and hash-chained per VM: where the VM and its disks lived.
        CREATE TABLE residency (
            id INTEGER PRIMARY KEY,
            vm_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event TEXT NOT NULL,           -- arrived, left
            node_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            country TEXT NOT NULL,
            site TEXT NOT NULL,
            ts REAL NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            UNIQUE (vm_id, seq)
        );
        """
    )


def _m004_placement_figures(db: sqlite_utils.Database) -> None:
    """What placement reads per decision, kept up to date by triggers in the same transaction
    as each change: a node's capacity as columns (from its inventory and facts) and the
    resources its VMs commit (instead of a sum over every VM per decision)."""
    db.executescript(
        """
        ALTER TABLE nodes ADD COLUMN cap_cpus INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN cap_memory_mib INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN cap_disk_gib INTEGER NOT NULL DEFAULT 0;
        CREATE TRIGGER nodes_capacity AFTER UPDATE OF inventory, facts ON nodes BEGIN
            UPDATE nodes SET
                cap_cpus = CASE WHEN json_valid(NEW.inventory)
                    AND json_type(NEW.inventory, '$.cpus') = 'integer'
                    THEN max(json_extract(NEW.inventory, '$.cpus'), 0) ELSE 0 END,
                cap_memory_mib = CASE WHEN json_valid(NEW.inventory)
                    AND json_type(NEW.inventory, '$.memory_bytes') = 'integer'
                    THEN max(json_extract(NEW.inventory, '$.memory_bytes'), 0) / 1048576
                    ELSE 0 END,
                cap_disk_gib = CASE WHEN json_valid(NEW.facts)
                    AND json_type(NEW.facts, '$.disk_gib') = 'integer'
                    THEN max(json_extract(NEW.facts, '$.disk_gib'), 0) ELSE 0 END
            WHERE id = NEW.id;
        END;
        CREATE TRIGGER nodes_capacity_new AFTER INSERT ON nodes
            WHEN NEW.inventory IS NOT NULL OR NEW.facts IS NOT NULL BEGIN
            UPDATE nodes SET inventory = inventory WHERE id = NEW.id;
        END;
        UPDATE nodes SET inventory = inventory;
        -- Covering: a create's shortlist reads only this, never the wide rows (inventory).
        CREATE INDEX nodes_placement ON nodes (reported_status, cordoned, revoked_at, id, site,
            country, provider, profile, last_seen, interval_s, cap_cpus, cap_memory_mib,
            cap_disk_gib);
        CREATE INDEX vms_group ON vms (anti_affinity, node_id) WHERE deleted_at IS NULL
            AND anti_affinity IS NOT NULL;

        CREATE TABLE node_usage (
            node_id TEXT PRIMARY KEY,
            vcpus INTEGER NOT NULL,
            memory_mib INTEGER NOT NULL,
            disk_gib INTEGER NOT NULL,
            vms INTEGER NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO node_usage SELECT node_id, sum(vcpus), sum(memory_mib), sum(disk_gib),
            count(*) FROM vms WHERE deleted_at IS NULL AND node_id IS NOT NULL GROUP BY node_id;
        CREATE TRIGGER vms_usage_insert AFTER INSERT ON vms
            WHEN NEW.deleted_at IS NULL AND NEW.node_id IS NOT NULL BEGIN
            INSERT INTO node_usage VALUES (NEW.node_id, NEW.vcpus, NEW.memory_mib, NEW.disk_gib, 1)
                ON CONFLICT (node_id) DO UPDATE SET vcpus = vcpus + excluded.vcpus,
                memory_mib = memory_mib + excluded.memory_mib,
                disk_gib = disk_gib + excluded.disk_gib, vms = vms + 1;
        END;
        CREATE TRIGGER vms_usage_update
            AFTER UPDATE OF node_id, deleted_at, vcpus, memory_mib, disk_gib ON vms BEGIN
            UPDATE node_usage SET vcpus = vcpus - OLD.vcpus,
                memory_mib = memory_mib - OLD.memory_mib, disk_gib = disk_gib - OLD.disk_gib,
                vms = vms - 1
                WHERE node_id = OLD.node_id AND OLD.deleted_at IS NULL;
            INSERT INTO node_usage SELECT NEW.node_id, NEW.vcpus, NEW.memory_mib, NEW.disk_gib, 1
                WHERE NEW.deleted_at IS NULL AND NEW.node_id IS NOT NULL
                ON CONFLICT (node_id) DO UPDATE SET vcpus = vcpus + excluded.vcpus,
                memory_mib = memory_mib + excluded.memory_mib,
                disk_gib = disk_gib + excluded.disk_gib, vms = vms + 1;
        END;
        CREATE TRIGGER vms_usage_delete AFTER DELETE ON vms
            WHEN OLD.deleted_at IS NULL AND OLD.node_id IS NOT NULL BEGIN
            UPDATE node_usage SET vcpus = vcpus - OLD.vcpus,
                memory_mib = memory_mib - OLD.memory_mib, disk_gib = disk_gib - OLD.disk_gib,
                vms = vms - 1 WHERE node_id = OLD.node_id;
        END;
        """
    )


_HEADROOM = """
    UPDATE nodes SET headroom = (
        SELECT min(
            (mem - coalesce(u.memory_mib, 0)) * 1.0 / mem,
            (cpul - coalesce(u.vcpus, 0)) * 1.0 / cpul,
            CASE WHEN nodes.cap_disk_gib > 0
                 THEN (nodes.cap_disk_gib - coalesce(u.disk_gib, 0)) * 1.0 / nodes.cap_disk_gib
                 ELSE 1.0 END)
        FROM (SELECT max(nodes.cap_memory_mib - coalesce(r.memory_mib, 0), 0) AS mem,
                     CAST(max(nodes.cap_cpus - coalesce(r.cpus, 0), 0) * 4 AS INTEGER) AS cpul
              FROM (SELECT 1) LEFT JOIN profile_reservations r ON r.profile = nodes.profile)
             LEFT JOIN node_usage u ON u.node_id = nodes.id)
"""


def _m005_placement_headroom(db: sqlite_utils.Database) -> None:
    """Each node's headroom before a new VM (the smallest free fraction of memory, vCPUs at 4x
    and disk), kept by triggers and indexed for online nodes: a fleet-wide create reads the
    emptiest nodes first instead of judging every node. Reservations come from the hardware
    profiles, which the aggregator writes into ``profile_reservations`` at start."""
    db.executescript(
        f"""
        CREATE TABLE profile_reservations (
            profile TEXT PRIMARY KEY,
            cpus INTEGER NOT NULL,
            memory_mib INTEGER NOT NULL
        ) WITHOUT ROWID;
        ALTER TABLE nodes ADD COLUMN headroom REAL;
        CREATE INDEX nodes_headroom ON nodes (headroom DESC, id)
            WHERE reported_status = 'online' AND cordoned = 0 AND revoked_at IS NULL;
        CREATE TRIGGER nodes_headroom_capacity
            AFTER UPDATE OF cap_cpus, cap_memory_mib, cap_disk_gib, profile ON nodes BEGIN
            {_HEADROOM} WHERE id = NEW.id;
        END;
        CREATE TRIGGER usage_headroom_insert AFTER INSERT ON node_usage BEGIN
            {_HEADROOM} WHERE id = NEW.node_id;
        END;
        CREATE TRIGGER usage_headroom_update AFTER UPDATE ON node_usage BEGIN
            {_HEADROOM} WHERE id = NEW.node_id;
        END;
        CREATE TRIGGER reservations_headroom_insert AFTER INSERT ON profile_reservations BEGIN
            {_HEADROOM} WHERE profile = NEW.profile;
        END;
        CREATE TRIGGER reservations_headroom_update AFTER UPDATE ON profile_reservations BEGIN
            {_HEADROOM} WHERE profile = NEW.profile;
        END;
        {_HEADROOM};
        """
    )


def _m006_residency_head(db: sqlite_utils.Database) -> None:
    """Each VM keeps the hash and length of its residency chain, so removing the chain's last
    rows (or all of them) is detected too."""
    db.executescript(
        """
        ALTER TABLE vms ADD COLUMN residency_head TEXT NOT NULL DEFAULT '';
        ALTER TABLE vms ADD COLUMN residency_length INTEGER NOT NULL DEFAULT 0;
        UPDATE vms SET
            residency_head = coalesce((SELECT hash FROM residency r WHERE r.vm_id = vms.id
                                       ORDER BY seq DESC LIMIT 1), ''),
            residency_length = (SELECT count(*) FROM residency r WHERE r.vm_id = vms.id);
        """
    )


def _m007_moves(db: sqlite_utils.Database) -> None:
    """Moving VMs between nodes: each move (live, cold, or a restart after its node was lost)
    with the order it waits for; drains; VMs to remove from a lost node when it returns. A
    move in progress holds its VM's resources on the destination (triggers, like node_usage's
    own), so nothing else is placed into the room it needs."""
    db.executescript(
        """
        ALTER TABLE nodes ADD COLUMN lease_s REAL NOT NULL DEFAULT 0;
        -- Its certificate's subjectAltNames (space-separated): where its libvirtd is reached.
        ALTER TABLE nodes ADD COLUMN alt_names TEXT NOT NULL DEFAULT '';
        ALTER TABLE vms ADD COLUMN vm_spec TEXT;        -- the VmSpec ordered, JSON
        ALTER TABLE vms ADD COLUMN on_node_loss TEXT NOT NULL DEFAULT 'wait';  -- or restart
        ALTER TABLE orders ADD COLUMN move_id TEXT;
        ALTER TABLE orders ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
        CREATE TABLE moves (
            id TEXT PRIMARY KEY,
            vm_id TEXT NOT NULL,
            source TEXT NOT NULL,
            dest TEXT NOT NULL DEFAULT '',  -- '' when no destination could be found
            mode TEXT NOT NULL,             -- live, cold, restart
            state TEXT NOT NULL,            -- preparing, migrating, adopting, releasing,
                                            -- succeeded, failed
            settings TEXT NOT NULL DEFAULT '{}',
            step_order TEXT,                -- the order the move waits for
            prepared TEXT NOT NULL DEFAULT '{}',  -- the destination's answer to receive
            result TEXT NOT NULL DEFAULT '{}',
            error TEXT NOT NULL DEFAULT '',
            drain_id TEXT,
            actor TEXT NOT NULL DEFAULT '',
            vcpus INTEGER NOT NULL DEFAULT 0,     -- held on the destination while it runs
            memory_mib INTEGER NOT NULL DEFAULT 0,
            disk_gib INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE UNIQUE INDEX moves_open_vm ON moves (vm_id) WHERE finished_at IS NULL;
        CREATE INDEX moves_open_step ON moves (step_order) WHERE finished_at IS NULL;
        CREATE INDEX moves_vm ON moves (vm_id, created_at);
        CREATE INDEX moves_drain ON moves (drain_id) WHERE drain_id IS NOT NULL;
        -- The dispatcher looks every turn for VMs to restart after a node loss: only these.
        CREATE INDEX vms_restart_on_loss ON vms (node_id) WHERE on_node_loss = 'restart'
            AND deleted_at IS NULL;
        CREATE TRIGGER moves_hold AFTER INSERT ON moves
            WHEN NEW.finished_at IS NULL AND NEW.dest != '' BEGIN
            INSERT INTO node_usage VALUES (NEW.dest, NEW.vcpus, NEW.memory_mib, NEW.disk_gib, 0)
                ON CONFLICT (node_id) DO UPDATE SET vcpus = vcpus + excluded.vcpus,
                memory_mib = memory_mib + excluded.memory_mib,
                disk_gib = disk_gib + excluded.disk_gib;
        END;
        CREATE TRIGGER moves_release AFTER UPDATE OF finished_at ON moves
            WHEN OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL AND NEW.dest != ''
            BEGIN
            UPDATE node_usage SET vcpus = vcpus - NEW.vcpus,
                memory_mib = memory_mib - NEW.memory_mib, disk_gib = disk_gib - NEW.disk_gib
                WHERE node_id = NEW.dest;
        END;
        CREATE TABLE drains (
            id TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            state TEXT NOT NULL,            -- running, done, incomplete
            parallel INTEGER NOT NULL,
            mode TEXT NOT NULL,             -- auto, live, cold
            settings TEXT NOT NULL DEFAULT '{}',
            actor TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE UNIQUE INDEX drains_running ON drains (node_id) WHERE finished_at IS NULL;
        CREATE INDEX drains_node ON drains (node_id, created_at);
        CREATE TABLE evictions (
            vm_id TEXT NOT NULL,
            node_id TEXT NOT NULL,          -- the lost node that may still hold it
            created_at REAL NOT NULL,
            order_id TEXT,
            done_at REAL,
            PRIMARY KEY (vm_id, node_id)
        );
        """
    )


def _m008_order_latency(db: sqlite_utils.Database) -> None:
    """When each order was first published, and how long it took from then to the node's
    final report (/metrics' order latency histogram)."""
    db.conn.executescript(
        """
        ALTER TABLE orders ADD COLUMN sent_at REAL;
        ALTER TABLE orders ADD COLUMN latency_s REAL;
        UPDATE orders SET sent_at = (SELECT MIN(ts) FROM order_history h
                                     WHERE h.order_id = orders.id AND h.state = 'sent');
        CREATE INDEX orders_latency ON orders (latency_s) WHERE latency_s IS NOT NULL;
        """
    )


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_foundation", _m001_foundation),
    ("002_trust", _m002_trust),
    ("003_vms", _m003_vms),
    ("004_placement_figures", _m004_placement_figures),
    ("005_placement_headroom", _m005_placement_headroom),
    ("006_residency_head", _m006_residency_head),
    ("007_moves", _m007_moves),
    ("008_order_latency", _m008_order_latency),
]


def apply(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations this database lacks; return their names."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT name FROM migrations").fetchall()}
    applied = []
    for name, migrate in MIGRATIONS:
        if name in done:
            continue
        with db.conn:
            migrate(db)
            db.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, datetime('now'))", [name]
            )
        applied.append(name)
    return applied
