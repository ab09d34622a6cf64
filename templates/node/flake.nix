{
  description = "node-service: a Node.js HTTP service run by mvm in a microVM";

  # Where mvm comes from. The .invalid placeholder never resolves: set it to the mvm you use
  # (a git URL or path:/your/checkout), or pass --override-input mvm <flake>.
  inputs.mvm.url = "git+https://mvm.invalid/mvm.git";
  inputs.nixpkgs.follows = "mvm/nixpkgs";

  outputs =
    { self, mvm, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      # mvm.toml is the declaration; the flake only reads it.
      workload = mvm.lib.mkWorkload {
        inherit pkgs;
        ir = builtins.fromTOML (builtins.readFile ./mvm.toml);
      };
    in
    {
      # nix eval --raw .#workloads.default.json
      workloads.default = workload;
      # The packages the image holds, joined: nix build .#root
      packages.${system} = {
        root = workload.roots.web;
        workload-json = workload.workloadJson;
      };
      checks.${system}.ir = workload.check;
      devShells.${system}.default = pkgs.mkShell {
        packages = [ mvm.packages.${system}.mvm ];
      };
    };
}
