# lifeboat (RPM %pre): the service user, before the files are installed, from the same line as
# /usr/lib/sysusers.d/lifeboat.conf (packaging/lifeboat.sysusers; a test keeps them equal), as
# Fedora's %sysusers_create_package does.
systemd-sysusers --replace=/usr/lib/sysusers.d/lifeboat.conf - <<'SYSUSERS' >/dev/null 2>&1 || :
u lifeboat - "lifeboat backup agent" /var/lib/lifeboat -
SYSUSERS
