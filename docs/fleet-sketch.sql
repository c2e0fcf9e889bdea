-- A sketch of fleet mode's writes, for the estimates in docs/fleet.md ("On paper"): NOT the exporter's schema
-- (that one is created by the exporter itself). Per batch of ids: ingest (queue insert + file position), claim
-- (FOR UPDATE SKIP LOCKED under a lease), settle (dequeue + finished + 40 ledger rows), each one transaction;
-- the WAL each phase writes is recorded in the table `wal`.
--
--   psql -f docs/fleet-sketch.sql -c "CALL run(10, 500)" -c "TRUNCATE wal" -c "CALL run(400, 500)" \
--        -c "SELECT phase, round(sum(bytes) / (400 * 500)) FROM wal GROUP BY phase"
--
-- A long CALL reports its statistics only when its session goes idle, so autovacuum does not see the dead
-- rows while it runs. To watch vacuum, issue many short CALLs instead (e.g. 60 x "CALL run(10, 500);").
\set ON_ERROR_STOP 1
CREATE TABLE queue (id text PRIMARY KEY, due timestamptz NOT NULL, attempts int NOT NULL DEFAULT 0,
  lease_until timestamptz, claimed_by text, labels jsonb);
CREATE INDEX queue_due ON queue (due);
CREATE TABLE finished (id text PRIMARY KEY, finished_at timestamptz NOT NULL);
CREATE INDEX finished_at ON finished (finished_at);
CREATE TABLE ledger (key text PRIMARY KEY, value double precision NOT NULL) WITH (fillfactor = 70);
INSERT INTO ledger SELECT 'series' || g, 0 FROM generate_series(1, 2000) g;
CREATE TABLE positions (instance text, source text, offs bigint, PRIMARY KEY (instance, source));
INSERT INTO positions VALUES ('pod', 'app-log', 0);
CREATE TABLE wal (phase text, bytes numeric);

CREATE PROCEDURE run(batches int, bsize int) LANGUAGE plpgsql AS $$
DECLARE lsn pg_lsn; b int; ids text[];
BEGIN
  FOR b IN 1..batches LOOP
    -- ingest: a batch of ids + the file position, one transaction
    lsn := pg_current_wal_insert_lsn();
    INSERT INTO queue (id, due, labels)
      SELECT 'gen_' || md5(random()::text || clock_timestamp()::text), now() - interval '1 s', '{"feature":"f1"}'
      FROM generate_series(1, bsize);
    UPDATE positions SET offs = offs + bsize * 250;
    COMMIT;
    INSERT INTO wal VALUES ('ingest', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), lsn)); COMMIT;
    -- claim
    lsn := pg_current_wal_insert_lsn();
    WITH c AS (SELECT id FROM queue WHERE due <= now() AND (lease_until IS NULL OR lease_until < now())
               ORDER BY due LIMIT bsize FOR UPDATE SKIP LOCKED)
    UPDATE queue q SET lease_until = now() + interval '60 s', claimed_by = 'resolver-1'
      FROM c WHERE q.id = c.id;
    COMMIT;
    INSERT INTO wal VALUES ('claim', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), lsn)); COMMIT;
    -- settle: dequeue + finished + ledger (40 series touched by the batch), one transaction
    lsn := pg_current_wal_insert_lsn();
    WITH d AS (DELETE FROM queue WHERE claimed_by = 'resolver-1' RETURNING id)
      INSERT INTO finished SELECT id, now() FROM d;
    UPDATE ledger SET value = value + 1 WHERE key IN (SELECT 'series' || g FROM generate_series(1, 40) g);
    COMMIT;
    INSERT INTO wal VALUES ('settle', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), lsn)); COMMIT;
  END LOOP;
END $$;
