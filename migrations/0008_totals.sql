-- Running MCAL totals (issue 13): admission read SUM(cost) over every debit
-- ever made, a scan that grows with clients × months. Triggers keep one row
-- per scope instead, so each admission reads three rows.
--
-- scope is 'global' (name ''), 'customer' or 'reseller'.
CREATE TABLE mcal_totals (
    scope TEXT NOT NULL,
    name  TEXT NOT NULL COLLATE NOCASE,
    total INTEGER NOT NULL,
    PRIMARY KEY (scope, name)
);

INSERT INTO mcal_totals (scope, name, total)
SELECT 'global', '', SUM(cost) FROM mcal_debits HAVING COUNT(*) > 0;
INSERT INTO mcal_totals (scope, name, total)
SELECT 'customer', customer, SUM(cost) FROM mcal_debits GROUP BY customer;
INSERT INTO mcal_totals (scope, name, total)
SELECT 'reseller', reseller, SUM(cost) FROM mcal_debits WHERE reseller IS NOT NULL GROUP BY reseller;

CREATE TRIGGER mcal_totals_insert AFTER INSERT ON mcal_debits BEGIN
    INSERT INTO mcal_totals (scope, name, total) VALUES ('global', '', NEW.cost)
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
    INSERT INTO mcal_totals (scope, name, total) VALUES ('customer', NEW.customer, NEW.cost)
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
    INSERT INTO mcal_totals (scope, name, total)
        SELECT 'reseller', NEW.reseller, NEW.cost WHERE NEW.reseller IS NOT NULL
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
END;

CREATE TRIGGER mcal_totals_delete AFTER DELETE ON mcal_debits BEGIN
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'global' AND name = '';
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'customer' AND name = OLD.customer;
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'reseller' AND name = OLD.reseller;
END;

CREATE TRIGGER mcal_totals_update AFTER UPDATE OF cost, customer, reseller ON mcal_debits BEGIN
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'global' AND name = '';
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'customer' AND name = OLD.customer;
    UPDATE mcal_totals SET total = total - OLD.cost WHERE scope = 'reseller' AND name = OLD.reseller;
    INSERT INTO mcal_totals (scope, name, total) VALUES ('global', '', NEW.cost)
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
    INSERT INTO mcal_totals (scope, name, total) VALUES ('customer', NEW.customer, NEW.cost)
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
    INSERT INTO mcal_totals (scope, name, total)
        SELECT 'reseller', NEW.reseller, NEW.cost WHERE NEW.reseller IS NOT NULL
        ON CONFLICT (scope, name) DO UPDATE SET total = total + excluded.total;
END;
