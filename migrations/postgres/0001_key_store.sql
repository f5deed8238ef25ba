-- Tenant data keys, wrapped by the master key. Never in the log: erasing a tenant's rows
-- crypto-shreds every body sealed for it.

CREATE TABLE loom_key_store_meta (
    id           smallint PRIMARY KEY CHECK (id = 1),
    -- A fixed value sealed with the master key: a wrong master key is refused at start.
    master_check bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE loom_tenant_keys (
    tenant_id  uuid        NOT NULL,
    purpose    text        NOT NULL CHECK (purpose IN ('data', 'digest')),
    version    integer     NOT NULL CHECK (version > 0),
    key_id     uuid        NOT NULL,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, purpose, version)
);

CREATE TABLE loom_erased_tenants (
    tenant_id uuid PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now()
);
