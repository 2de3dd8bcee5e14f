# Shell helpers the scripts share. Source it (it sets no options and runs nothing):
#   source "$(dirname "$0")/lib.sh"

# port_open HOST PORT: true when something accepts TCP connections on HOST:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for_port HOST PORT [SECONDS]: waits until HOST:PORT accepts connections, looking every
# 0.1 s for at most SECONDS (a whole number, default 10). Returns 1 if it never did.
wait_for_port() {
    local host=$1 port=$2 seconds=${3:-10} i
    for ((i = 0; i < seconds * 10; i++)); do
        if port_open "$host" "$port"; then
            return 0
        fi
        sleep 0.1
    done
    port_open "$host" "$port"
}

# build_floor: builds the product owner's raw-epoll floor (../shared/floor, a yardstick that is
# never copied into this repository) in a folder outside it, FLOOR_DIR (default
# /tmp/roomcast-floor), and prints the binary's path. Serves PORT with WORKERS epoll threads.
build_floor() {
    local src dir=${FLOOR_DIR:-/tmp/roomcast-floor}
    src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/floor"
    if [ ! -f "$src/Cargo.toml" ]; then
        echo "the floor is not at $src" >&2
        return 1
    fi
    mkdir -p "$dir"
    cp -r "$src/." "$dir/" && chmod -R u+w "$dir"
    (cd "$dir" && cargo build --release -q) >&2 || return 1
    echo "$dir/target/release/limit"
}

# need_browser: installs Debian's chromium and chromium-driver when chromedriver is missing
# (the browser tests and scripts/screenshots.sh drive them). Needs root, as CI has.
need_browser() {
    if ! command -v chromedriver >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    fi
}
