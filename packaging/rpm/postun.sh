# lifeboat (RPM %postun): reload units; on upgrade restart a running service on the new binary.
# The configuration (%config(noreplace)) and /var/lib/lifeboat stay; the archives in S3 are
# never touched.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    systemctl try-restart lifeboat.service >/dev/null 2>&1 || :
fi
