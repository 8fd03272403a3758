-- The clinic schema of the seed apps, as `pgcast demo` creates it: appointments (seeds 000, 001,
-- 002, 004), slot reservations with expiry (seed 002) and the waiting-room queue (seed 004).
-- Every table has REPLICA IDENTITY FULL so row policies can check DELETEs and rows leaving a view.
CREATE TABLE IF NOT EXISTS appointments (
    id          bigserial PRIMARY KEY,
    tenant_id   int NOT NULL,
    patient_id  int NOT NULL,
    provider_id int NOT NULL,
    status      text NOT NULL DEFAULT 'booked',
    starts_at   timestamptz NOT NULL,
    notes       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE appointments REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS slot_reservations (
    id          bigserial PRIMARY KEY,
    tenant_id   int NOT NULL,
    provider_id int NOT NULL,
    patient_id  int NOT NULL,
    slot_time   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    UNIQUE (provider_id, slot_time)
);
ALTER TABLE slot_reservations REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS queue_entries (
    id             bigserial PRIMARY KEY,
    tenant_id      int NOT NULL,
    appointment_id bigint REFERENCES appointments (id) ON DELETE CASCADE,
    patient_id     int NOT NULL,
    position       int NOT NULL,
    state          text NOT NULL DEFAULT 'waiting',
    checked_in_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE queue_entries REPLICA IDENTITY FULL;

-- The day an appointment falls on (UTC), for seed 004's `subscribe:appointments {date}` filter
-- (examples/socketio.toml): filters compare a column with a value. Set by a trigger rather than
-- a generated column, which logical replication does not send before PostgreSQL 18.
ALTER TABLE appointments ADD COLUMN IF NOT EXISTS starts_on date;
CREATE OR REPLACE FUNCTION appointments_starts_on() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.starts_on := (NEW.starts_at AT TIME ZONE 'UTC')::date;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER appointments_starts_on BEFORE INSERT OR UPDATE OF starts_at ON appointments
    FOR EACH ROW EXECUTE FUNCTION appointments_starts_on();
