from bank_sim.app import main

main()
