{
  description = "nix-workload: a workload declared in Nix, run by mvm in a microVM";

  # Where mvm comes from. The .invalid placeholder never resolves: set it to the mvm you use
  # (a git URL or path:/your/checkout), or pass --override-input mvm <flake>.
  inputs.mvm.url = "git+https://mvm.invalid/mvm.git";
  inputs.nixpkgs.follows = "mvm/nixpkgs";

  outputs =
    { self, mvm, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      workload = mvm.lib.mkWorkload (import ./workload.nix // { inherit pkgs; });
    in
    {
      # The IR: nix eval --raw .#workloads.default.json > workload.json
      workloads.default = workload;
      packages.${system} = {
        # The packages the image holds, joined: nix build .#root
        root = workload.roots.main;
        # The IR as a store file: nix build .#workload-json
        workload-json = workload.workloadJson;
        default = workload.workloadJson;
      };
      checks.${system}.ir = workload.check;
      devShells.${system}.default = pkgs.mkShell {
        packages = [ mvm.packages.${system}.mvm ];
      };
    };
}
