from bench.transfer_scaling import main

main()
