# lifeboat (RPM %preun): on erase (not upgrade), disable and stop the service (and the launch
# restore unit, if an administrator enabled it).
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now lifeboat.service >/dev/null 2>&1 || :
    systemctl --no-reload disable lifeboat-restore.service >/dev/null 2>&1 || :
fi
