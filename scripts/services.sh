#!/usr/bin/env bash
# Make sure MariaDB (127.0.0.1:3306, root, empty password), Redis
# (127.0.0.1:6379) and NATS with JetStream (127.0.0.1:4222) answer; start them
# when they do not. Used by .ci/run and by developers before `make test`. Exits
# non-zero if any stays down.
set -euo pipefail

wait_for() {  # name, command...
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then echo "services: $name is up"; return 0; fi
    sleep 1
  done
  echo "services: $name did not come up" >&2
  return 1
}

mariadb_up() { mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u root ping; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
# NATS greets every connection with an INFO line; JetStream is asked for with -js below.
nats_up() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222 && head -c 4 <&3' 2>/dev/null | grep -q INFO; }

if ! mariadb_up >/dev/null 2>&1; then
  echo "services: starting MariaDB"
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
fi
if ! redis_up; then
  echo "services: starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
if ! nats_up; then
  echo "services: starting NATS (JetStream)"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server
fi

wait_for MariaDB mariadb_up
wait_for Redis redis_up
wait_for NATS nats_up

# The suite connects as root over TCP with an empty password; say so clearly if that is refused.
if ! mysql --protocol=tcp -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1; then
  echo "services: MariaDB refuses root over TCP without a password (socket auth?);" >&2
  echo "          set TEST_MYSQL_SERVER=mysql+asyncmy://user:pass@127.0.0.1:3306 for a user that may create databases" >&2
  exit 1
fi
