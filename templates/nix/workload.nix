# The workload, in Nix: mkWorkload's attributes — the Workload IR's own field names, with a few
# shortcuts (packages, entrypoint, env as plain strings, secrets by name, "host:port" grants;
# see mvm's docs/nix.md). flake.nix turns it into the IR; there is no mvm.toml.
{
  name = "nix-workload";
  # Attribute paths of nixpkgs: the root filesystem holds these and nothing else.
  packages = [
    "busybox"
    "jq"
  ];
  entrypoint = [
    "sh"
    "-c"
    "echo '{\"hello\": \"nix\"}' | jq ."
  ];
  resources = {
    cpu_cores = 1;
    memory_mb = 256;
  };
  env.LANG = "C.UTF-8";
  # Resolved on the host at launch; only the name "api-token" is ever stored.
  secrets.API_TOKEN = {
    name = "api-token";
    optional = true;
  };
  # No network: list "host:port" grants here to allow egress to them.
  network.egress.allowlist = [ ];
  # How `mvm build` resolves policy (not part of the IR).
  profile = "restrictive";
}
