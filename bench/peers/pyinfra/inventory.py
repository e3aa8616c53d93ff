"""pyinfra inventory: the hosts of ``PEER_HOSTS``, reached through the test hosts' ssh_config,
host keys checked strictly against its known_hosts."""

import os

web = (
    os.environ["PEER_HOSTS"].split(","),
    {
        "ssh_config_file": os.environ["SSH_CONFIG"],
        "ssh_known_hosts_file": os.environ["KNOWN_HOSTS"],
        "ssh_strict_host_key_checking": "yes",
    },
)
