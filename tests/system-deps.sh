#!/usr/bin/env bash
# Installs the Debian packages that the real-client tests start: Xvfb, the
# TigerVNC viewer, vncsnapshot, xclip and xdotool, Chromium and noVNC for the
# browser test, and (for the benchmarks) x11vnc and TigerVNC's X0tigervnc.
# Does nothing when every program is already there.
set -euo pipefail
need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xtigervncviewer >/dev/null || need+=(tigervnc-viewer)
command -v vncsnapshot >/dev/null || need+=(vncsnapshot)
command -v x11vnc >/dev/null || need+=(x11vnc)
command -v X0tigervnc >/dev/null || need+=(tigervnc-scraping-server)
command -v xdotool >/dev/null || need+=(xdotool)
command -v xclip >/dev/null || need+=(xclip)
command -v xrandr >/dev/null || need+=(x11-xserver-utils)
command -v chromium >/dev/null || need+=(chromium)
[ -f /usr/share/novnc/vnc.html ] || need+=(novnc)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q "${need[@]}" xauth x11-utils
