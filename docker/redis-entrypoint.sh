#!/bin/sh
# Entrypoint of compose.yaml's redis service (mounted read-only into the redis image).
#
# Starts redis-server with the password of ASSAYER_REDIS_PASSWORD written into a config file that
# only the redis user can read, on a tmpfs: never on a command line, where `ps` on the host and
# `docker inspect` would show it. Its arguments (compose's `command`) go on to redis-server.
# The healthcheck reads the same variable through REDISCLI_AUTH, also off the command line.
#
# Env: ASSAYER_REDIS_PASSWORD (required), ASSAYER_REDIS_CONF (/run/redis/redis.conf).
set -eu

conf="${ASSAYER_REDIS_CONF:-/run/redis/redis.conf}"
password="${ASSAYER_REDIS_PASSWORD:-}"

fail() {
    printf 'error: %s\n  fix: %s\n' "$1" "$2" >&2
    exit 2
}

[ -n "$password" ] || fail "ASSAYER_REDIS_PASSWORD is empty" \
    "set ASSAYER_REDIS_PASSWORD in .env (see .env.example) or the environment"
# The placeholders of .env.example (assayer/settings.py: PLACEHOLDER_PASSWORDS).
case "$password" in
    change-me-redis | change-me-dashboard)
        fail "ASSAYER_REDIS_PASSWORD is still the placeholder '$password' from .env.example, which anyone can read" \
            "replace ASSAYER_REDIS_PASSWORD in .env (or your environment) with a secret of your own, e.g. the output of \`openssl rand -hex 24\`"
        ;;
esac

# Every byte as \xHH in double quotes: redis.conf's own quoting then holds any password.
hex="$(printf '%s' "$password" | od -An -v -tx1 | tr -d ' \n' | sed 's/../\\x&/g')"
umask 077
printf 'requirepass "%s"\n' "$hex" >"$conf"
unset ASSAYER_REDIS_PASSWORD password hex
exec redis-server "$conf" "$@"
